"""The C boundary: every ctypes call kvmerge-local makes into llama.cpp lives in this package.

This module holds the library loader, the state functions and the patch's own symbols; :mod:`.stock` the stock
API (models, contexts, batches, tokens), re-exported here so callers use ``_lib.<function>`` alike.

llama-cpp-python (pinned 0.3.36) loads ``libllama`` and binds the stock API; we reuse its library handle
and its bindings for the stock functions, and bind the symbols our patch adds
(``patches/0001-kvmerge-attention-evidence.patch``, ``patches/0002-kvmerge-cache-tensors.patch``) ourselves, each under its C prototype.  The state
functions are bound again on fresh function pointers with ``c_void_p`` buffers, so NumPy arrays pass
without copies and llama-cpp-python's own bindings stay untouched.

Nothing here is imported at package import time: the library loads on first use.  When the loaded
library lacks the patch (a stock llama-cpp-python wheel, or an old build), :func:`lib` raises
:class:`PatchMissingError` naming ``make setup``.
"""
from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from typing import Any

import numpy as np

from ...errors import KVMergeError, PatchMissingError

log = logging.getLogger(__name__)

#: The patch version this Python code speaks (``LLAMA_KVM_PATCH_VERSION`` in the patched ``llama.h``).
PATCH_VERSION = 2

_BUILD_HINT = (
    "run `make setup` in the kvmerge-local checkout (it builds llama-cpp-python 0.3.36 from its sdist "
    "with patches/ applied into .venv), or unset LLAMA_CPP_LIB_PATH if it points at a stock build"
)

_c_int32_p = ctypes.POINTER(ctypes.c_int32)
_c_float_p = ctypes.POINTER(ctypes.c_float)


def _ensure_env() -> None:
    # OpenMP's default spin-wait makes llama.cpp 10-100x slower on small VMs (docs/LLAMA_CPP.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@lru_cache(maxsize=None)
def llama() -> Any:
    """The ``llama_cpp.llama_cpp`` module (stock bindings), imported on first use."""
    _ensure_env()
    try:
        import llama_cpp.llama_cpp as ll  # noqa: PLC0415 - lazy on purpose
    except Exception as exc:  # ImportError, or OSError when the shared library cannot load
        raise PatchMissingError(f"llama-cpp-python could not be imported ({exc}); {_BUILD_HINT}") from exc
    return ll


def _bind(cdll: ctypes.CDLL, name: str, argtypes: list, restype: Any) -> Any:
    try:
        fn = cdll._FuncPtr((name, cdll))  # a fresh pointer: never mutate llama-cpp-python's bindings
    except AttributeError as exc:
        raise PatchMissingError(
            f"the loaded libllama ({getattr(cdll, '_name', '?')}) has no symbol {name}: it was built "
            f"without the kvmerge-local patch; {_BUILD_HINT}"
        ) from exc
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


class _Lib:
    """Bound functions of the patched library (attribute names are the C names)."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        self.cdll = cdll
        vp, i32, u8p = ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p
        # LLAMA_API int32_t llama_kvm_patch_version(void);
        self.llama_kvm_patch_version = _bind(cdll, "llama_kvm_patch_version", [], i32)
        # LLAMA_API int32_t llama_kvm_evidence_enable(struct llama_context * ctx, int32_t n_window);
        self.llama_kvm_evidence_enable = _bind(cdll, "llama_kvm_evidence_enable", [vp, i32], i32)
        # LLAMA_API void llama_kvm_evidence_reset(struct llama_context * ctx);
        self.llama_kvm_evidence_reset = _bind(cdll, "llama_kvm_evidence_reset", [vp], None)
        # LLAMA_API int32_t llama_kvm_evidence_get(struct llama_context * ctx, int32_t il, float * out,
        #                                          int32_t n_head, int32_t n_cells);
        self.llama_kvm_evidence_get = _bind(cdll, "llama_kvm_evidence_get", [vp, i32, vp, i32, i32], i32)
        # LLAMA_API int32_t llama_kvm_kv_size(const struct llama_context * ctx);
        self.llama_kvm_kv_size = _bind(cdll, "llama_kvm_kv_size", [vp], i32)
        # LLAMA_API int32_t llama_kvm_seq_cells(const struct llama_context * ctx, llama_seq_id seq_id,
        #                                       int32_t * slots, llama_pos * pos, int32_t n_max);
        self.llama_kvm_seq_cells = _bind(cdll, "llama_kvm_seq_cells", [vp, i32, vp, vp, i32], i32)
        # LLAMA_API int32_t llama_kvm_cache_layout(const struct llama_context * ctx, int32_t * n_layer,
        #                                          int32_t * kv_size, int32_t * v_trans, int32_t * n_stream);
        self.llama_kvm_cache_layout = _bind(cdll, "llama_kvm_cache_layout", [vp, vp, vp, vp, vp], i32)
        # LLAMA_API int32_t llama_kvm_cache_tensor(const struct llama_context * ctx, int32_t il, int32_t which,
        #         void ** data, int32_t * type, int64_t * ne, uint64_t * nb, uint64_t * nbytes, int32_t * is_host,
        #         const char ** buf_name);
        self.llama_kvm_cache_tensor = _bind(cdll, "llama_kvm_cache_tensor",
                                            [vp, i32, i32, vp, vp, vp, vp, vp, vp, vp], i32)
        # LLAMA_API int32_t llama_kvm_seq_set_cells(struct llama_context * ctx, llama_seq_id seq_id,
        #                                           const llama_pos * pos, int32_t n);
        self.llama_kvm_seq_set_cells = _bind(cdll, "llama_kvm_seq_set_cells", [vp, i32, vp, i32], i32)
        # LLAMA_API void llama_synchronize(struct llama_context * ctx);
        self.llama_synchronize = _bind(cdll, "llama_synchronize", [vp], None)
        # LLAMA_API size_t llama_state_seq_get_size(struct llama_context * ctx, llama_seq_id seq_id);
        self.llama_state_seq_get_size = _bind(cdll, "llama_state_seq_get_size", [vp, i32], ctypes.c_size_t)
        # LLAMA_API size_t llama_state_seq_get_data(struct llama_context * ctx, uint8_t * dst, size_t size,
        #                                           llama_seq_id seq_id);
        self.llama_state_seq_get_data = _bind(
            cdll, "llama_state_seq_get_data", [vp, u8p, ctypes.c_size_t, i32], ctypes.c_size_t
        )
        # LLAMA_API size_t llama_state_seq_set_data(struct llama_context * ctx, const uint8_t * src,
        #                                           size_t size, llama_seq_id dest_seq_id);
        self.llama_state_seq_set_data = _bind(
            cdll, "llama_state_seq_set_data", [vp, u8p, ctypes.c_size_t, i32], ctypes.c_size_t
        )


@lru_cache(maxsize=None)
def lib() -> _Lib:
    """The patched library, checked: raises :class:`PatchMissingError` when the patch is absent or stale."""
    ll = llama()
    out = _Lib(ll._lib)
    version = out.llama_kvm_patch_version()
    if version != PATCH_VERSION:
        raise PatchMissingError(
            f"libllama carries kvmerge-local patch version {version}, this code needs {PATCH_VERSION}; "
            f"{_BUILD_HINT}"
        )
    ll.llama_backend_init()
    log.debug("patched libllama loaded from %s (patch v%d)", getattr(ll._lib, "_name", "?"), version)
    return out


def _ptr(arr: np.ndarray) -> int:
    if not arr.flags.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return arr.ctypes.data


# --- state ---------------------------------------------------------------------------------------------

def state_seq_get(ctx: int, seq_id: int, out: np.ndarray | None = None) -> np.ndarray:
    """One sequence's state blob as ``uint8[n_bytes]`` (``out`` reused when large enough)."""
    lb = lib()
    size = int(lb.llama_state_seq_get_size(ctx, seq_id))
    if size == 0:
        raise KVMergeError(f"llama_state_seq_get_size failed for sequence {seq_id}")
    if out is None or out.nbytes < size:
        out = np.empty(size, dtype=np.uint8)
    buf = out[:size]
    got = int(lb.llama_state_seq_get_data(ctx, _ptr(buf), size, seq_id))
    if got != size:
        raise KVMergeError(f"llama_state_seq_get_data wrote {got} of {size} bytes for sequence {seq_id}")
    return buf


def state_seq_set(ctx: int, blob: np.ndarray, seq_id: int) -> None:
    """Load a sequence state blob (``uint8[n_bytes]``) into ``seq_id``; raises KVMergeError when refused."""
    got = int(lib().llama_state_seq_set_data(ctx, _ptr(blob), blob.nbytes, seq_id))
    if got != blob.nbytes:
        raise KVMergeError(
            f"llama_state_seq_set_data refused the blob for sequence {seq_id} (read {got} of {blob.nbytes} "
            "bytes: type, row size, layout or cell count does not match this context)"
        )


# --- patch: cells and evidence -------------------------------------------------------------------------

def kv_size(ctx: int) -> int:
    """Number of cells (slots) of the context's KV cache."""
    n = int(lib().llama_kvm_kv_size(ctx))
    if n < 0:
        raise KVMergeError("this context has no plain KV cache")
    return n


def seq_cells(ctx: int, seq_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(slots int32[n], pos int32[n])`` of the cells holding ``seq_id``, in state-blob order."""
    lb = lib()
    n = int(lb.llama_kvm_seq_cells(ctx, seq_id, None, None, 0))
    if n < 0:
        raise KVMergeError(f"llama_kvm_seq_cells failed for sequence {seq_id}")
    slots = np.empty(n, dtype=np.int32)
    pos = np.empty(n, dtype=np.int32)
    lb.llama_kvm_seq_cells(ctx, seq_id, _ptr(slots), _ptr(pos), n)
    return slots, pos


def evidence_enable(ctx: int, n_window: int) -> None:
    """Accumulate evidence over the last ``n_window`` queries of each decode (0: all; < 0: off)."""
    if lib().llama_kvm_evidence_enable(ctx, int(n_window)) != 0:
        raise KVMergeError("attention evidence needs a single-stream (unified) KV cache")


def evidence_reset(ctx: int) -> None:
    """Zero the evidence accumulator."""
    lib().llama_kvm_evidence_reset(ctx)


def evidence_get(ctx: int, il: int, n_head: int, n_cells: int, out: np.ndarray) -> bool:
    """Fill ``out: float32[n_head, n_cells]`` with layer ``il``'s evidence by slot; False if none was taken."""
    if out.dtype != np.float32 or out.shape != (n_head, n_cells):
        raise ValueError(f"out must be float32[{n_head}, {n_cells}]")
    r = int(lib().llama_kvm_evidence_get(ctx, il, _ptr(out), n_head, n_cells))
    if r < 0:
        raise KVMergeError(f"llama_kvm_evidence_get failed for layer {il} (evidence not enabled?)")
    return r > 0


# --- patch v2: the cache's own tensors, the cell rewrite (compaction in place) -------------------------

def cache_layout(ctx: int) -> dict[str, int]:
    """``n_layer``, ``kv_size``, ``v_trans`` (0/1) and ``n_stream`` of the context's KV cache."""
    out = np.zeros(4, np.int32)
    base = out.ctypes.data
    if int(lib().llama_kvm_cache_layout(ctx, base, base + 4, base + 8, base + 12)) != 0:
        raise KVMergeError("this context has no plain KV cache")
    return dict(zip(("n_layer", "kv_size", "v_trans", "n_stream"), (int(x) for x in out)))


def cache_tensor(ctx: int, il: int, which: int) -> dict[str, Any]:
    """Layer ``il``'s K (``which=0``) or V (1) tensor of the cache: ``ptr`` (int address), ``type`` (ggml id),
    ``ne``/``nb`` (ne0, ne1 / nb0, nb1), ``nbytes``, ``is_host``, ``buffer`` (its backend buffer's name) and,
    for host memory, ``host``: a writable ``uint8[nbytes]`` NumPy view of the tensor's own bytes (no copy;
    valid while the context lives)."""
    data = ctypes.c_void_p()
    ints = np.zeros(2, np.int32)  # type, is_host
    ne = np.zeros(2, np.int64)
    nb = np.zeros(3, np.uint64)  # nb0, nb1, nbytes
    name = ctypes.c_char_p()
    r = int(lib().llama_kvm_cache_tensor(ctx, il, which, ctypes.byref(data), ints.ctypes.data, ne.ctypes.data,
                                         nb.ctypes.data, nb.ctypes.data + 16, ints.ctypes.data + 4,
                                         ctypes.byref(name)))
    if r != 0 or not data.value:
        raise KVMergeError(f"llama_kvm_cache_tensor failed for layer {il} ({'KV'[which]})")
    out: dict[str, Any] = {"ptr": int(data.value), "type": int(ints[0]), "ne": (int(ne[0]), int(ne[1])),
                           "nb": (int(nb[0]), int(nb[1])), "nbytes": int(nb[2]), "is_host": bool(ints[1]),
                           "buffer": (name.value or b"?").decode("utf-8", "replace"), "host": None}
    if out["is_host"]:
        out["host"] = host_bytes(out["ptr"], out["nbytes"])
    return out


def host_bytes(ptr: int, nbytes: int) -> np.ndarray:
    """A writable ``uint8[nbytes]`` view of host memory at ``ptr`` that llama.cpp owns (e.g. a span of the KV
    cache's buffer covering several layers' tensors, see :func:`cache_tensor`); no copy."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


def seq_set_cells(ctx: int, seq_id: int, pos: np.ndarray) -> bool:
    """Cells ``0..n-1`` hold ``pos`` (int32[n]) for ``seq_id``, its other cells are freed, as
    ``llama_state_seq_set_data`` would leave them; K/V data untouched.  False when llama.cpp refuses (then
    nothing changed: a pending K shift, another sequence in the way, ...)."""
    p = np.ascontiguousarray(pos, dtype=np.int32)
    return int(lib().llama_kvm_seq_set_cells(ctx, seq_id, _ptr(p), len(p))) == 0


def synchronize(ctx: int) -> None:
    """Wait for the context's pending backend work (before touching the cache's memory)."""
    lib().llama_synchronize(ctx)


def memory_seq_pos_min(ctx: int, seq_id: int) -> int:
    ll = llama()
    # LLAMA_API llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
    return int(ll.llama_memory_seq_pos_min(ll.llama_get_memory(ctypes.c_void_p(ctx)), seq_id))


from .stock import *  # noqa: E402,F401,F403 - the stock API (models, contexts, batches, tokens)
