"""The C boundary: every ctypes call kvmerge-local makes into llama.cpp lives in this module.

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

from ..errors import KVMergeError, PatchMissingError

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


# --- models, contexts, batches (stock API through llama-cpp-python's bindings) --------------------------

_LOG_CB = None


def route_logs() -> None:
    """Send llama.cpp's log lines to this module's logger (debug level; errors at warning)."""
    global _LOG_CB
    ll = llama()
    if _LOG_CB is not None:
        return

    # typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
    @ll.llama_log_callback
    def _cb(level: int, text: bytes, _user: int) -> None:
        msg = text.decode("utf-8", "replace").rstrip()
        if msg:
            log.log(logging.WARNING if level in (3, 4) else logging.DEBUG, "llama.cpp: %s", msg)

    _LOG_CB = _cb
    # LLAMA_API void llama_log_set(ggml_log_callback log_callback, void * user_data);
    ll.llama_log_set(_cb, ctypes.c_void_p(0))


def model_load(path: str, n_gpu_layers: int = 0) -> int:
    """``llama_model_load_from_file``; returns the model pointer or 0 when llama.cpp refuses the file."""
    ll = llama()
    lib()
    route_logs()
    params = ll.llama_model_default_params()
    params.n_gpu_layers = int(n_gpu_layers)
    # LLAMA_API struct llama_model * llama_model_load_from_file(const char * path_model,
    #                                                           struct llama_model_params params);
    m = ll.llama_model_load_from_file(path.encode(), params)
    return int(m or 0)


def model_free(model: int) -> None:
    # LLAMA_API void llama_model_free(struct llama_model * model);
    llama().llama_model_free(ctypes.c_void_p(model))


def model_info(model: int) -> dict[str, Any]:
    """Hyper-parameters the bridge needs, read through the stock getters."""
    ll = llama()
    m = ctypes.c_void_p(model)
    vocab = ll.llama_model_get_vocab(m)
    return {
        "arch": model_meta(model, "general.architecture") or "?",
        "name": model_meta(model, "general.name") or "",
        "n_layer": ll.llama_model_n_layer(m),
        "n_head": ll.llama_model_n_head(m),
        "n_head_kv": ll.llama_model_n_head_kv(m),
        "n_embd": ll.llama_model_n_embd(m),
        "n_ctx_train": ll.llama_model_n_ctx_train(m),
        "n_swa": ll.llama_model_n_swa(m),
        "rope_type": ll.llama_model_rope_type(m),
        "n_vocab": ll.llama_vocab_n_tokens(vocab),
        "bos": ll.llama_vocab_bos(vocab),
        "eos": ll.llama_vocab_eos(vocab),
        "size": ll.llama_model_size(m),
    }


def model_meta(model: int, key: str) -> str | None:
    """A GGUF metadata string of the loaded model, or None."""
    ll = llama()
    buf = ctypes.create_string_buffer(4096)
    # LLAMA_API int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key,
    #                                            char * buf, size_t buf_size);
    n = ll.llama_model_meta_val_str(ctypes.c_void_p(model), key.encode(), buf, ctypes.sizeof(buf))
    if n >= ctypes.sizeof(buf):  # a long value (chat templates run to 10k characters): read it whole
        buf = ctypes.create_string_buffer(n + 1)
        n = ll.llama_model_meta_val_str(ctypes.c_void_p(model), key.encode(), buf, ctypes.sizeof(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def context_new(model: int, *, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int, flash_attn: bool,
                type_k: int, type_v: int, offload_kqv: bool = True) -> int:
    """``llama_init_from_model`` for one sequence with a unified cache; 0 when llama.cpp refuses."""
    ll = llama()
    p = ll.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_ubatch, 1
    p.n_threads = p.n_threads_batch = n_threads
    p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    p.type_k, p.type_v = type_k, type_v
    p.offload_kqv = offload_kqv
    p.kv_unified = True
    p.no_perf = True
    # LLAMA_API struct llama_context * llama_init_from_model(struct llama_model * model,
    #                                                        struct llama_context_params params);
    c = ll.llama_init_from_model(ctypes.c_void_p(model), p)
    return int(c or 0)


def context_free(ctx: int) -> None:
    # LLAMA_API void llama_free(struct llama_context * ctx);
    llama().llama_free(ctypes.c_void_p(ctx))


def n_ctx(ctx: int) -> int:
    # LLAMA_API uint32_t llama_n_ctx(const struct llama_context * ctx);
    return int(llama().llama_n_ctx(ctypes.c_void_p(ctx)))


class Batch:
    """A reusable ``llama_batch`` for one sequence, filled from NumPy (token ids, positions, output flags)."""

    def __init__(self, n_max: int) -> None:
        ll = llama()
        # LLAMA_API struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
        self.batch = ll.llama_batch_init(n_max, 0, 1)
        self.n_max = n_max
        self.token = np.ctypeslib.as_array(self.batch.token, shape=(n_max,))
        self.pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_max,))
        self.n_seq_id = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_max,))
        self.logits = np.ctypeslib.as_array(self.batch.logits, shape=(n_max,))
        for i in range(n_max):
            self.batch.seq_id[i][0] = 0
        self.n_seq_id[:] = 1

    def fill(self, tokens: np.ndarray, positions: np.ndarray, output: np.ndarray) -> None:
        n = len(tokens)
        if n > self.n_max:
            raise ValueError(f"batch of {n} tokens exceeds its capacity {self.n_max}")
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.logits[:n] = output
        self.batch.n_tokens = n

    def free(self) -> None:
        if self.batch is not None:
            # LLAMA_API void llama_batch_free(struct llama_batch batch);
            llama().llama_batch_free(self.batch)
            self.batch = None


def decode(ctx: int, batch: Batch) -> int:
    """``llama_decode``: 0 on success (1: no KV slot, 2: aborted, < 0: error)."""
    # LLAMA_API int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
    return int(llama().llama_decode(ctypes.c_void_p(ctx), batch.batch))


def logits_ith(ctx: int, i: int, n_vocab: int) -> np.ndarray:
    """A copy of the logits of output ``i`` (-1: the last), ``float32[n_vocab]``."""
    # LLAMA_API float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
    p = llama().llama_get_logits_ith(ctypes.c_void_p(ctx), i)
    if not p:
        raise KVMergeError(f"no logits for output {i}")
    return np.ctypeslib.as_array(p, shape=(n_vocab,)).copy()


def memory_seq_pos_max(ctx: int, seq_id: int) -> int:
    ll = llama()
    # LLAMA_API llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
    return int(ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctypes.c_void_p(ctx)), seq_id))


def memory_clear(ctx: int) -> None:
    ll = llama()
    # LLAMA_API void llama_memory_clear(llama_memory_t mem, bool data);
    ll.llama_memory_clear(ll.llama_get_memory(ctypes.c_void_p(ctx)), True)


def memory_seq_add(ctx: int, seq_id: int, p0: int, p1: int, delta: int) -> None:
    ll = llama()
    # LLAMA_API void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0,
    #                                     llama_pos p1, llama_pos delta);
    ll.llama_memory_seq_add(ll.llama_get_memory(ctypes.c_void_p(ctx)), seq_id, p0, p1, delta)


def memory_seq_rm(ctx: int, seq_id: int, p0: int, p1: int) -> bool:
    """Remove the cells of ``seq_id`` with positions in ``[p0, p1)`` (``p1 < 0``: to the end)."""
    ll = llama()
    # LLAMA_API bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
    return bool(ll.llama_memory_seq_rm(ll.llama_get_memory(ctypes.c_void_p(ctx)), seq_id, p0, p1))


def tokenize(model: int, text: str, add_special: bool, parse_special: bool = False) -> np.ndarray:
    """Token ids of ``text`` (``int32[n]``)."""
    ll = llama()
    vocab = ll.llama_model_get_vocab(ctypes.c_void_p(model))
    raw = text.encode("utf-8")
    cap = len(raw) + 16
    buf = (ll.llama_token * cap)()
    # LLAMA_API int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
    #                                  llama_token * tokens, int32_t n_tokens_max, bool add_special,
    #                                  bool parse_special);
    n = ll.llama_tokenize(vocab, raw, len(raw), buf, cap, add_special, parse_special)
    if n < 0:
        cap = -n
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(vocab, raw, len(raw), buf, cap, add_special, parse_special)
    return np.frombuffer(buf, dtype=np.int32, count=n).copy()


def token_piece(model: int, token: int) -> bytes:
    """The bytes of one token (special tokens rendered)."""
    ll = llama()
    vocab = ll.llama_model_get_vocab(ctypes.c_void_p(model))
    buf = ctypes.create_string_buffer(256)
    # LLAMA_API int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
    #                                        int32_t length, int32_t lstrip, bool special);
    n = ll.llama_token_to_piece(vocab, token, buf, 256, 0, True)
    return buf.raw[:max(n, 0)]


def token_is_eog(model: int, token: int) -> bool:
    ll = llama()
    # LLAMA_API bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
    return bool(ll.llama_vocab_is_eog(ll.llama_model_get_vocab(ctypes.c_void_p(model)), token))
