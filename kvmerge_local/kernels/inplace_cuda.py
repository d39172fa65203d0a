"""Compaction in place on llama.cpp's CUDA cache tensors (``numba.cuda``), and the device-pointer wrapper.

:func:`apply_inplace_cuda` has the signature of the CPU :func:`kvmerge_local.kernels.inplace.apply_inplace`, so
the bridge dispatches on where the buffers live.  Layout (one sequence whose cells are slots ``0..N-1`` in
position order, ``N = plan.n_in``), per layer:

- K, and V when not transposed: ``uint8[kv_size, row_bytes]``; a row is all KV heads of one cell in the ggml
  type (f32/f16/bf16 elements or q8_0/q4_0 blocks); head h is elements ``h*head_dim:(h+1)*head_dim``.
- V with ``v_trans`` (float types only): ``[n_embd_v_gqa, kv_size]`` in the element type (float32, float16,
  uint16 for bf16) or as ``uint8[n_embd_v_gqa, kv_size * element_bytes]``.

After the call slots ``0..m-1`` of every (layer, head) hold the plan's output; slots ``m..`` are don't-care.

Ordering (why nothing is overwritten before it is read), per layer and per tensor -- the permutation of the
CPU path (:mod:`.inplace_swap`; kinds and undo in :mod:`.cuda_undo`):

1. every merged slot's sources are decoded into a float32 scratch buffer ``X``, and every *late* copy (source
   before its slot, ``src < j``, or a cell several slots read) is staged raw -- before anything is written;
2. every other copy (all of a selection's) *exchanges* its slot with its source cell ``src > j``, in ascending
   j: a later exchange never reads a cell an earlier one wrote;
3. the late slots' current segments are saved (the undo's only copy), then merges are computed from ``X`` into
   ``Y`` (float32, source order, as the CPU kernel) and encoded into their slots (f16 saturated; bf16
   round-half-even; q8_0/q4_0 requantized, only the merged heads' blocks); staged copies are written back.

Kernels are launched on the default stream in that order, so each step sees the previous one's writes.

Synchronization with llama.cpp: ggml's CUDA backend allocates the cache in the device's **primary context**
(the runtime API), which is the context ``numba.cuda`` uses too, so its pointers are valid here; but ggml
computes on its own streams.  Wrap the compaction in :func:`synchronized` (``cuda.synchronize()`` of the whole
device before reading the cache and after writing it), and only then tell llama.cpp about the new cells.

What the bridge calls (CUDA cache, layers offloaded)::

    k = [device_array_from_pointer(ptr, (kv_size, k_row_bytes), np.uint8) for ...]  # C-contiguous: nb1 == row
    v = ...  # rows as K, or v_trans: (n_embd_v_gqa, kv_size) in the element dtype (one stream per tensor)
    with synchronized():
        apply_inplace_cuda(k, v, plan, v_trans=v_trans, k_type=k_type, v_type=v_type)
        rerotate_inplace_cuda(k, idx, cos_t, sin_t, neox=rope.neox, k_type=k_type,
                              nrot_hadamard=codec.cache_rot_size(k_type, head_dim, "k"))  # reindex only
    # then the patch's cell rewrite (cells 0..m-1 hold plan.cell_positions(), the rest freed)

(``idx``/``cos_t``/``sin_t`` as ``bridge.rope._shift`` builds them from ``target - key_pos`` for slots
``0..m-1``.)  Planning needs only the keys: :func:`read_keys_cuda` (K's first ``N`` rows; bf16/quantized ones
decoded on the device) -- never the values.

Exact vs approximate (checked under the simulator; on a GPU the same arithmetic is pinned by using no FMA
contraction and round-to-nearest conversions, :mod:`.cuda_rows`, which the PTX test checks): copies are
bit-exact for every type; f32/f16/bf16 merges and f32/f16/bf16/q4_0 key re-rotation are bit-identical to the
CPU kernels; q8_0/q4_0 merges are bit-identical to dequantize -> CPU apply -> ``codec.quantize_rows(...,
Q8_VARIANT_REF)`` -- the rounding ggml's CUDA backend stores q8_0 with.  The CPU state path rounds q8_0 with
the x86 variant instead: a code can differ by 1 at a rounding midpoint or through the last bit of ``1/d``
(scales are equal); q4_0 has one rounding and matches the state path bit for bit.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
from numba import cuda

from ..codec.types import GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q4_0, TYPES, row_bytes
from ..plan import Plan
from . import cuda_rows as K
from .cuda_undo import DeviceKeySnapshot, DeviceUndo
from .inplace import swap_plans

log = logging.getLogger(__name__)

_ELEM = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_BF16: np.uint16}
_RAW = {2: np.uint16, 4: np.uint32}


# --- device memory ----------------------------------------------------------------------------------------------

class _HostBuffer:
    """Numpy's ``__array_interface__`` for simulator "device" memory (host memory under NUMBA_ENABLE_CUDASIM)."""

    def __init__(self, desc: dict) -> None:
        self.__array_interface__ = dict(desc, version=3)


def device_array_from_pointer(ptr: int, shape: tuple, dtype, strides: tuple | None = None, owner=None):
    """A ``numba.cuda`` device array over ``ptr`` (no copy): ``shape``, ``dtype``, byte ``strides`` (None: C order).

    On a GPU this is ``cuda.from_cuda_array_interface`` (the pointer must belong to the current, primary,
    context, as ggml's CUDA buffers do); ``owner`` is kept alive by the array.  Under the simulator the
    "device" is host memory, so the pointer is wrapped as a NumPy view inside a simulator array.
    """
    desc = {"shape": tuple(int(s) for s in shape), "typestr": np.dtype(dtype).str, "data": (int(ptr), False),
            "strides": None if strides is None else tuple(int(s) for s in strides), "version": 2}
    if K.SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray  # noqa: PLC0415

        return FakeCUDAArray(np.asarray(_HostBuffer(desc)))
    return cuda.from_cuda_array_interface(desc, owner=owner, sync=False)  # pragma: no cover - needs a GPU


def device_pointer(arr) -> int:
    """The device address of a ``numba.cuda`` array (under the simulator: its host address)."""
    if K.SIM:
        return int(arr.__array_interface__["data"][0])
    return int(arr.__cuda_array_interface__["data"][0])  # pragma: no cover - needs a GPU


@contextmanager
def synchronized():
    """``cuda.synchronize()`` before (llama.cpp's pending writes to the cache land) and after (our writes land
    before llama.cpp's next graph reads the cache)."""
    cuda.synchronize()
    try:
        yield
    finally:
        cuda.synchronize()


def _dev(a):
    """``(device array, host array or None)``: device arrays pass through; a host NumPy array (tests) is copied to
    the device, and :func:`_back` copies the result into it."""
    if getattr(a, "__cuda_ndarray__", False):
        return a, None
    if not K.SIM and hasattr(a, "__cuda_array_interface__"):  # pragma: no cover - e.g. CuPy arrays, on a GPU
        return cuda.as_cuda_array(a), None
    if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
        raise ValueError("host tensors must be C-contiguous NumPy arrays")
    return cuda.to_device(a), a


def _back(da, host) -> None:
    if host is not None:
        da.copy_to_host(host)


def _launch(kernel, n, *args):
    kernel[K.blocks(n), K.TPB](*args)


# --- plan bookkeeping (host) ------------------------------------------------------------------------------------

class _LayerWork:
    """What one layer's apply needs for one tensor, as small host arrays (from
    :func:`~kvmerge_local.kernels.inplace.swap_plans`, the CPU path's slot kinds: ``cf`` int[H, m] copy sources,
    ``fw`` int32[H, m] swaps, ``late`` int64[n_late, 2] late ``(head, slot)``): the
    swaps ``fw``; the late slots ``lh``/``lj`` -- merges ``mh``/``mj`` first, then the late copies
    ``sh``/``sj`` with their sources ``sc``; the merge sources ``nh``/``nc`` and ``xrow``."""

    def __init__(self, plan: Plan, w: np.ndarray, cf: np.ndarray, fw: np.ndarray, late: np.ndarray, l: int) -> None:
        N = plan.n_in
        self.fw = fw
        lh, lj = late[:, 0], late[:, 1]
        copy = cf[lh, lj] >= 0
        self.sh, self.sj = lh[copy].astype(np.int32), lj[copy].astype(np.int32)
        self.sc = cf[self.sh, self.sj].astype(np.int32)
        self.mh, self.mj = lh[~copy].astype(np.int32), lj[~copy].astype(np.int32)
        self.lh, self.lj = np.concatenate([self.mh, self.sh]), np.concatenate([self.mj, self.sj])
        # the sources the merged slots read (non-zero weights), as rows of X; xrow[t - t0]: X row of source t
        o = plan.offsets[l]
        starts, cnt = o[self.mh, self.mj], o[self.mh, self.mj + 1] - o[self.mh, self.mj]
        t = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(starts, cnt)
        h = np.repeat(self.mh, cnt).astype(np.int64)
        keep = w[t] != 0
        t, h = t[keep], h[keep]
        keys, inv = np.unique(h * N + plan.src[t], return_inverse=True)
        self.nh, self.nc = (keys // N).astype(np.int32), (keys % N).astype(np.int32)
        self.t0 = int(o[0, 0])
        self.xrow = np.zeros(max(int(o[-1, -1]) - self.t0, 1), np.int32)
        self.xrow[t - self.t0] = inv.reshape(-1)


# --- the in-place apply -----------------------------------------------------------------------------------------

def _views(a, type_id: int, trans: bool):
    """(raw-unit view, per-head unit count factor, element view) of one layer tensor."""
    if trans:
        el = TYPES[type_id].block_bytes
        if a.dtype == np.uint8:
            a = a.view(_ELEM[type_id])
        return a.view(_RAW[el]), a
    return a.view(np.uint16), a


def _decode(a, elem, type_id: int, trans: bool, d: int, nh, nc, X, n: int) -> None:
    """``X[r]`` (float32) = head ``nh[r]`` of cell ``nc[r]``; ``a`` the raw rows, ``elem`` the element view."""
    if TYPES[type_id].view is None:
        hb = row_bytes(type_id, d)
        _launch(K.gather_q, n * d, a, a.view(np.float16), hb, type_id == GGML_TYPE_Q4_0, nh, nc, X)
    elif type_id == GGML_TYPE_BF16:
        _launch(K.gather_bf16, n * d, elem.view(np.uint16), trans, d, nh, nc, X.view(np.uint32))
    else:
        _launch(K.gather_float, n * d, elem.view(_ELEM[type_id]), trans, d, nh, nc, X)


def _encode(a, elem, type_id: int, trans: bool, d: int, mh, mj, Y, n: int) -> None:
    """Head ``mh[r]`` of slot ``mj[r]`` = ``Y[r]`` encoded in the tensor's type (the inverse of :func:`_decode`)."""
    if TYPES[type_id].view is None:
        hb = row_bytes(type_id, d)
        _launch(K.write_q, n * (d // 32), a, a.view(np.float16), hb, type_id == GGML_TYPE_Q4_0, mh, mj, Y)
    elif type_id == GGML_TYPE_BF16:
        _launch(K.write_bf16, n * d, elem.view(np.uint16), trans, d, mh, mj, Y.view(np.uint32))
    else:
        hi = np.float32(65504.0 if type_id == GGML_TYPE_F16 else 0.0)
        _launch(K.write_float, n * d, elem.view(_ELEM[type_id]), trans, d, mh, mj, Y, hi)


def _apply_tensor(layers, plan: Plan, which: str, type_id: int, trans: bool, d: int, undo: DeviceUndo) -> None:
    w = plan.wk if which == "k" else plan.wv
    cf_all, fw_all, late_all, late_off = swap_plans(plan.offsets, plan.src, w, plan.n_in)
    d_off, d_w = cuda.to_device(plan.offsets), cuda.to_device(w)
    hb = row_bytes(type_id, d)
    for l, a0 in enumerate(layers):
        a, host = _dev(a0)
        work = _LayerWork(plan, w, cf_all[l], fw_all[l], late_all[late_off[l]:late_off[l + 1]], l)
        raw, elem = _views(a, type_id, trans)
        W = d if trans else hb // 2
        # 1. from the untouched cache: the merge sources (decoded) and the late copies' sources (raw)
        n_need, n_merge, n_stage = len(work.nc), len(work.mj), len(work.sj)
        X = Y = R = None
        if n_merge:
            X = cuda.device_array((max(n_need, 1), d), np.float32)
            _decode(a, elem, type_id, trans, d, cuda.to_device(work.nh), cuda.to_device(work.nc), X, n_need)
        if n_stage:
            R = cuda.device_array((n_stage, W), raw.dtype)
            sh = cuda.to_device(work.sh)
            _launch(K.stage_raw, n_stage * W, raw, trans, W, sh, cuda.to_device(work.sc), R, True)
        # 2. the swaps, ascending slots (recorded first: the undo knows what ran from flags set on the device)
        unit = undo.record(raw, trans, W, work.fw, work.lh, work.lj, a, host)
        unit.swap()
        # 3. the late slots: their current segments saved, then merges through scratch and the staged copies
        unit.save_late()
        if n_merge:
            Y = cuda.device_array((n_merge, d), np.float32)
            mh, mj = cuda.to_device(work.mh), cuda.to_device(work.mj)
            _launch(K.merge_rows, n_merge * d, X, cuda.to_device(work.xrow), work.t0, d_off, l, d_w, mh, mj, Y)
            _encode(a, elem, type_id, trans, d, mh, mj, Y, n_merge)
        if n_stage:
            _launch(K.stage_raw, n_stage * W, raw, trans, W, sh, cuda.to_device(work.sj), R, False)
        _back(a, host)


def _check(layers, shape: tuple[int, int, int], type_id: int, trans: bool, name: str) -> int:
    """head_dim of the layer tensors, validated against ``shape = (n_layer, n_kv_head, n_in)``."""
    n_layer, n_kv_head, n_in = shape
    if type_id not in TYPES:
        raise ValueError(f"{name}: unsupported ggml type {type_id}")
    if trans and TYPES[type_id].view is None:
        raise ValueError(f"{name}: quantized tensors cannot be transposed")
    if len(layers) != n_layer:
        raise ValueError(f"{name}: {len(layers)} layers, expected {n_layer}")
    a = layers[0]
    if trans:
        n_embd, kv = a.shape[0], a.shape[1] // (TYPES[type_id].block_bytes if a.dtype == np.uint8 else 1)
    else:
        kv = a.shape[0]
        n_embd = a.shape[1] // TYPES[type_id].block_bytes * TYPES[type_id].block
        if a.dtype != np.uint8:
            raise ValueError(f"{name}: row tensors must be uint8[kv_size, row_bytes], got {a.dtype}")
    if kv < n_in:
        raise ValueError(f"{name}: kv_size {kv} < {n_in} input cells")
    if n_embd % n_kv_head:
        raise ValueError(f"{name}: {n_embd} elements per cell do not split into {n_kv_head} heads")
    return n_embd // n_kv_head


def apply_inplace_cuda(k_layers, v_layers, plan: Plan, *, v_trans: bool, k_type: int, v_type: int,
                       undo: DeviceUndo | None = None) -> DeviceUndo:
    """Apply ``plan`` in place on per-layer cache tensors (see the module docstring for layouts and ordering).

    ``k_layers``/``v_layers``: sequences of ``numba.cuda`` device arrays, e.g. from
    :func:`device_array_from_pointer` (a C-contiguous host NumPy array is copied to the device, compacted there
    and copied back: tests).  Raises ValueError for a bad plan or layout before anything is written.  Returns
    the exact undo (:class:`~.cuda_undo.DeviceUndo`; ``undo``, filled, when given -- so that a failure part-way
    through the layers can still be undone): its ``restore()`` puts every tensor back bit for bit, on the device.
    """
    plan.validate()
    shape = (plan.n_layer, plan.n_kv_head, plan.n_in)
    dk = _check(k_layers, shape, k_type, False, "K")
    dv = _check(v_layers, shape, v_type, v_trans, "V")
    undo = DeviceUndo() if undo is None else undo
    _apply_tensor(k_layers, plan, "k", k_type, False, dk, undo)
    _apply_tensor(v_layers, plan, "v", v_type, v_trans, dv, undo)
    return undo


def read_keys_cuda(k_layers, n_cells: int, n_kv_head: int, *, k_type: int) -> np.ndarray:
    """The keys of cells ``0..n_cells-1`` on the host, ``[n_layer, n_kv_head, n_cells, head_dim]``, as the methods
    plan on them (what ``bridge.state.float_views`` gives): f16/f32 keys as stored (raw copy of those rows only);
    bf16/q8_0/q4_0 decoded to float32 on the device, then float16 (quantized keys stay Hadamard-rotated).  The
    values are never read."""
    L = len(k_layers)
    d = _check(k_layers, (L, n_kv_head, n_cells), k_type, False, "K")
    out = np.empty((L, n_kv_head, n_cells, d), np.float32 if k_type == GGML_TYPE_F32 else np.float16)
    h = np.repeat(np.arange(n_kv_head, dtype=np.int32), n_cells)
    c = np.tile(np.arange(n_cells, dtype=np.int32), n_kv_head)
    nh, nc = cuda.to_device(h), cuda.to_device(c)
    X = cuda.device_array((max(len(h), 1), d), np.float32)
    for l, a0 in enumerate(k_layers):
        a, _ = _dev(a0)
        if k_type in (GGML_TYPE_F16, GGML_TYPE_F32):
            rows = a[:n_cells].copy_to_host().view(out.dtype)  # only the N cells' rows cross the bus
            out[l] = rows.reshape(n_cells, n_kv_head, d).transpose(1, 0, 2)
        elif len(h):
            _decode(a, a, k_type, False, d, nh, nc, X, len(h))
            out[l] = X.copy_to_host()[:len(h)].reshape(n_kv_head, n_cells, d)
    return out


# --- key re-rotation --------------------------------------------------------------------------------------------

def rerotate_inplace_cuda(k_layers, idx: np.ndarray, cos_t: np.ndarray, sin_t: np.ndarray, *, neox: bool,
                          k_type: int, nrot_hadamard: int = 0) -> int:
    """Rotate cached keys in place: head h of slot c of layer l by row ``idx[l, h, c]`` (int[L, H, n], -1: leave
    alone) of the float32 angle tables ``cos_t``/``sin_t`` ``[n_rows, n_rot // 2]`` (the bridge builds them as
    ``bridge.rope._shift`` does).  Every type is decoded to float32 (rows touched only), rotated, encoded:
    f32/f16 as :func:`kvmerge_local.kernels.rope.rotate_keys` (bit-identical), bf16 round-half-even, q8_0/q4_0
    un-Hadamard-rotated (``nrot_hadamard``: ``codec.cache_rot_size``; 0 = none), rotated, re-Hadamard-rotated and
    requantized (REF rounding).  A touched f16/bf16 row's dims past ``n_rot`` round-trip through float32 (exact,
    except that a signalling NaN comes back quiet).  Returns the number of head rows rotated."""
    idx = np.asarray(idx)
    L = len(k_layers)
    if idx.ndim != 3 or idx.shape[0] != L:
        raise ValueError(f"idx must be int[{L}, n_kv_head, n_cells], got {idx.shape}")
    d = _check(k_layers, idx.shape, k_type, False, "K")
    ct = cuda.to_device(np.ascontiguousarray(cos_t, np.float32))
    st = cuda.to_device(np.ascontiguousarray(sin_t, np.float32))
    if 2 * ct.shape[1] > d:
        raise ValueError(f"n_rot {2 * ct.shape[1]} > head_dim {d}")
    quant = TYPES[k_type].view is None
    done = 0
    for l, a0 in enumerate(k_layers):
        h, c = np.nonzero(idx[l] >= 0)
        n = len(h)
        if n == 0:
            continue
        a, host = _dev(a0)
        done += n
        nh, nc = cuda.to_device(h.astype(np.int32)), cuda.to_device(c.astype(np.int32))
        X = cuda.device_array((n, d), np.float32)
        _decode(a, a, k_type, False, d, nh, nc, X, n)
        scale = np.float32(np.float32(1.0) / np.sqrt(np.float32(nrot_hadamard))) if nrot_hadamard else None
        if quant and nrot_hadamard:
            _launch(K.fwht_rows, n * (d // nrot_hadamard), X, nrot_hadamard, scale)
        ridx = cuda.to_device(idx[l][h, c].astype(np.int32))
        _launch(K.rope_rows, n * ct.shape[1], X, ridx, ct, st, bool(neox))
        if quant and nrot_hadamard:
            _launch(K.fwht_rows, n * (d // nrot_hadamard), X, nrot_hadamard, scale)
        _encode(a, a, k_type, False, d, nh, nc, X, n)
        _back(a, host)
    return done


__all__ = ["apply_inplace_cuda", "rerotate_inplace_cuda", "read_keys_cuda", "device_array_from_pointer",
           "device_pointer", "synchronized", "DeviceUndo", "DeviceKeySnapshot"]
