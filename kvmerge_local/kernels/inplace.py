"""Compaction in place on the KV cache's own memory (CPU): the plan rewrites cells ``0..m-1`` of every layer.

The arrays are laid out like llama.cpp's cache tensors (one per layer; see ``KVBridge``'s ``CacheTensors``):

- K, and V when not transposed: ``uint8[kv_size, row_bytes]``, a row is ``[head 0 | head 1 | ...]`` (``head_dim``
  elements, or the q8_0/q4_0 blocks of ``head_dim`` elements, per head);
- V transposed (flash attention off): element-typed ``[n_embd_v_gqa, kv_size]`` (float16, float32, or bf16 as
  ``uint16``): row ``h * head_dim + e`` holds element ``e`` of head ``h`` for every cell.

The plan's input cells are cells ``0..n_in-1`` in order; output slot ``j`` lands in cell ``j``.  Per (layer,
K or V tensor), with ``s_j`` the source cell of a copy slot (:mod:`.inplace_swap` has the details):

1. *late* slots -- merges, copies with ``s_j < j``, copies of a cell read by several slots -- are computed
   first, from the untouched cache, into a small scratch buffer;
2. every other copy (every copy of a selection plan) *exchanges* cell ``j``'s head segment with cell ``s_j``'s,
   in ascending ``j``, slot by slot across the heads (rows layout; sources prefetched a few slots ahead);
3. the scratch rows are written to their slots, whose contents are saved first.

So the cache's cells are permuted, not copied over, and :class:`InplaceUndo` restores it exactly from the
swaps and the (few) saved late segments: no undo copy of the cache.

The arithmetic is the state path's (:mod:`.apply`): copies move raw elements/blocks (bit-exact); float merges
accumulate ``w * x`` in float32 in source order, zero weights skipped, rounded once by ``store_row`` (f16,
f32); bf16 rows go through the codec like the quantized types: merges dequantize only the rows they read,
merge in float32 and re-encode only the merged rows (:mod:`kvmerge_local.codec`; bf16 rounds half-to-even), as
the state path does; a transposed bf16 V layer's merges decode the input cells to float32 (exact) and encode
the merged values back.  So cells ``0..m-1`` afterwards hold, bit for bit, what applying the same plan to the
state blob writes.  Nothing here knows llama.cpp.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit

from .. import codec
from ..codec.types import TYPE_IDS, TYPES
from ..plan import Plan
from . import inplace_swap as S
from .apply import _copy_source
from .f16 import as_kernel_array, load_math, store_row
from .intrinsics import HAS_VBMI2

_BF16 = TYPE_IDS["bf16"]


@njit(cache=True)
def _merge_slot(flat, cell_off, es, offsets, psrc, w, l, h, j, acc):
    """``acc = sum_t w[t] * x[psrc[t]]`` over slot j's non-zero weights in source order (the first initializes;
    none: zeros), float32, element ``e`` of cell ``c`` at ``flat[cell_off[c] + e*es]`` -- the arithmetic of
    :func:`~.apply.apply_plan_kernel`, so results are bit-identical to the state path."""
    d = acc.shape[0]
    first = True
    for t in range(offsets[l, h, j], offsets[l, h, j + 1]):
        wt = w[t]
        if wt == 0.0:
            continue
        o = cell_off[psrc[t]]
        if first:
            for e in range(d):
                acc[e] = wt * load_math(flat[o + e * es])
        else:
            for e in range(d):
                acc[e] += wt * load_math(flat[o + e * es])
        first = False
    if first:
        for e in range(d):
            acc[e] = 0.0


@njit(cache=True)
def swap_plans(offsets, psrc, w, n_in):
    """The kinds of every slot (:mod:`.inplace_swap`) for weights ``w``: ``cf`` int32[L, H, m] copy sources
    (-1 merged); ``fw`` int32[L, H, m] the cell a slot swaps with (-1: an identity or a late slot); ``late``
    int64[n_late, 2] the late slots ``(head, slot)``, layer ``l``'s at ``late_off[l]:late_off[l + 1]``.  A copy
    swaps when its source lies ahead (``s > j``) and no other copy slot reads that cell."""
    L, H, m1 = offsets.shape
    m = m1 - 1
    cf = np.empty((L, H, m), np.int32)
    fw = np.full((L, H, m), -1, np.int32)
    uses = np.zeros(n_in, np.int32)
    late_off = np.zeros(L + 1, np.int64)
    for l in range(L):
        n = 0
        for h in range(H):
            c = cf[l, h]
            for j in range(m):
                t0 = offsets[l, h, j]
                if offsets[l, h, j + 1] - t0 == 1:  # one source: a copy exactly when its weight is 1
                    c[j] = psrc[t0] if w[t0] == 1.0 else -1
                else:
                    t = _copy_source(offsets, w, l, h, j)
                    c[j] = psrc[t] if t >= 0 else -1
                if c[j] >= 0:
                    uses[c[j]] += 1
            for j in range(m):
                s = c[j]
                if s > j and uses[s] == 1:
                    fw[l, h, j] = s
                elif s != j:
                    n += 1
            for j in range(m):
                if c[j] >= 0:
                    uses[c[j]] = 0
        late_off[l + 1] = late_off[l] + n
    late = np.empty((late_off[L], 2), np.int64)
    for l in range(L):
        k = late_off[l]
        for h in range(H):
            for j in range(m):
                if cf[l, h, j] != j and fw[l, h, j] < 0:
                    late[k, 0] = h
                    late[k, 1] = j
                    k += 1
    return cf, fw, late, late_off


@njit(cache=True)
def _late_elems(flat, base, hs, cs, es, d, offsets, psrc, w, l, cf, late, n_in, out):
    """Float cache (f32, or f16 as uint16 bits), one layer, element ``e`` of head ``h`` of cell ``c`` at
    ``flat[base + h*hs + c*cs + e*es]``: ``out[k]`` (``[n_late, d]``, ``flat``'s dtype) = late slot ``late[k]``
    computed from the untouched cache -- its source's elements, or the merge rounded once by ``store_row``."""
    acc = np.empty(d, np.float32)
    cell_off = np.empty(n_in, np.int64)
    cur = -1
    for k in range(late.shape[0]):
        h, j = late[k, 0], late[k, 1]
        hb = base + h * hs
        s = cf[h, j]
        row = out[k]
        if s >= 0:
            o = hb + s * cs
            for e in range(d):
                row[e] = flat[o + e * es]
            continue
        if cur != h:  # where each input cell of head h starts
            for c in range(n_in):
                cell_off[c] = hb + c * cs
            cur = h
        _merge_slot(flat, cell_off, es, offsets, psrc, w, l, h, j, acc)
        store_row(acc, row, 0, 1)


@njit(cache=True)
def _merge_inputs(offsets, psrc, w, l, late, cf, N):
    """The (head, cell) rows the merged late slots read, numbered: ``idx[h, c]`` (-1 unread) and
    ``rows`` int64[n, 2]."""
    H = cf.shape[0]
    idx = np.full((H, N), -1, np.int64)
    n = 0
    for k in range(late.shape[0]):
        h, j = late[k, 0], late[k, 1]
        if cf[h, j] >= 0:
            continue
        for t in range(offsets[l, h, j], offsets[l, h, j + 1]):
            c = psrc[t]
            if w[t] != 0.0 and idx[h, c] < 0:
                idx[h, c] = n
                n += 1
    rows = np.empty((n, 2), np.int64)
    for h in range(H):
        for c in range(N):
            if idx[h, c] >= 0:
                rows[idx[h, c], 0] = h
                rows[idx[h, c], 1] = c
    return idx, rows


@njit(cache=True)
def _merge_f32(x, idx, offsets, psrc, w, l, late, cf, out):
    """float32 merges of the merged late slots from the dequantized rows ``x[idx[h, c]]`` into ``out[k]``
    (the arithmetic of :func:`~.apply.apply_plan_kernel` on float32)."""
    d = x.shape[1]
    xf = x.reshape(-1)
    acc = np.empty(d, np.float32)
    for k in range(late.shape[0]):
        h, j = late[k, 0], late[k, 1]
        if cf[h, j] >= 0:
            continue
        _merge_slot(xf, idx[h] * d, 1, offsets, psrc, w, l, h, j, acc)
        store_row(acc, out[k], 0, 1)


def _check(k_layers, v_layers, plan: Plan, v_trans: bool) -> None:
    L = plan.n_layer
    if len(k_layers) != L or len(v_layers) != L:
        raise ValueError(f"{len(k_layers)} K and {len(v_layers)} V layers for a plan of {L} layers")
    for a in (*k_layers, *v_layers):
        if not a.flags.writeable:
            raise ValueError("the cache views must be writable")
    kv_size = k_layers[0].shape[0]
    if plan.n_in > kv_size:
        raise ValueError(f"plan over {plan.n_in} cells, the cache has {kv_size}")
    for a in k_layers:
        if a.dtype != np.uint8 or a.ndim != 2 or a.shape[0] != kv_size or not a.flags.c_contiguous:
            raise ValueError("K layers must be C-contiguous uint8[kv_size, row_bytes]")
    for a in v_layers:
        if v_trans:
            if a.ndim != 2 or a.shape[1] != kv_size or not a.flags.c_contiguous:
                raise ValueError("transposed V layers must be C-contiguous [n_embd_v_gqa, kv_size]")
        elif a.dtype != np.uint8 or a.ndim != 2 or a.shape[0] != kv_size or not a.flags.c_contiguous:
            raise ValueError("V layers must be C-contiguous uint8[kv_size, row_bytes]")


class InplaceUndo:
    """How to put the cache back after :func:`apply_inplace` (exactly, bit for bit): per (layer, K or V)
    tensor, the swaps (``fw`` int32[H, m]) and the late slots (``late`` int64[n, 2]) with their saved previous
    contents (``saved``: uint8[n, head_bytes], or ``[n, d]`` in the element dtype when transposed) -- see
    :mod:`.inplace_swap`.  A tensor is recorded before its kernels run, with ``stage`` (int64[1]) that they set
    as their last step (1: permuted, 2: late slots written), so a failure part-way -- even an interrupt between
    two kernels -- restores exactly what was written."""

    def __init__(self) -> None:
        self.units: list = []  # (a, transposed, head_bytes or d, fw, late, saved, partition or None, stage)

    def restore(self) -> None:
        """Undo every recorded tensor, the last first."""
        while self.units:
            a, trans, w, fw, late, saved, part, stage = self.units.pop()
            if stage[0] >= 2:
                (S.restore_late_elems if trans else S.restore_late_rows)(a, w, late, saved)
            if stage[0] < 1:
                continue
            if not trans:
                S.unswap_rows(a, w, fw)
            elif part is None:
                S.unswap_elems(a, w, fw)
            else:
                S.unpartition_elems(a, w, fw, *part)


def _late_rows_coded(a: np.ndarray, type_id: int, plan: Plan, l: int, w: np.ndarray, cf, late) -> np.ndarray:
    """uint8[n_late, head_bytes]: the late slots of a quantized or bf16 rows layer ``a`` computed from the
    untouched cache: copies as raw bytes; merges dequantize only the rows they read, merge in float32 and
    re-encode (the state path's arithmetic)."""
    H = plan.n_kv_head
    hbytes = a.shape[1] // H
    scratch = np.empty((len(late), hbytes), np.uint8)
    is_copy = cf[late[:, 0], late[:, 1]] >= 0
    if is_copy.any():
        hc, jc = late[is_copy, 0], late[is_copy, 1]
        src = cf[hc, jc]
        for h in np.unique(hc):
            sel = hc == h
            scratch[is_copy.nonzero()[0][sel]] = a[src[sel], h * hbytes:(h + 1) * hbytes]
    if (~is_copy).any():
        d = codec.n_elems_of_row(type_id, hbytes)
        idx, rows = _merge_inputs(plan.offsets, plan.src, w, l, late, cf, plan.n_in)
        rawin = np.empty((len(rows), hbytes), np.uint8)
        for h in np.unique(rows[:, 0]):
            sel = rows[:, 0] == h
            rawin[sel] = a[rows[sel, 1], h * hbytes:(h + 1) * hbytes]
        x = codec.dequantize_rows(rawin, type_id)
        y = np.empty((len(late), d), np.float32)
        _merge_f32(x, idx, plan.offsets, plan.src, w, l, late, cf, y)
        merged = np.nonzero(~is_copy)[0]
        scratch[merged] = codec.quantize_rows(np.ascontiguousarray(y[merged]), type_id)
    return scratch


def _apply_layer_rows(a: np.ndarray, type_id: int, plan: Plan, l: int, w: np.ndarray, undo: InplaceUndo,
                      n_groups: int, kinds) -> None:
    """One layer's K (or non-transposed V) ``uint8[kv_size, row_bytes]`` in place: late slots computed, the
    swaps, the late slots written (their previous contents saved in ``undo``)."""
    t = TYPES[type_id]
    hbytes = a.shape[1] // plan.n_kv_head
    cf, fw, late = kinds
    if not len(late):
        scratch = np.empty((0, hbytes), np.uint8)
    elif t.view is not None and type_id != _BF16:  # f16 (uint16 bits) or f32 elements
        es = t.block_bytes
        flat = a.reshape(-1).view(np.float32 if t.view is np.float32 else np.uint16)
        d = hbytes // es
        out = np.empty((len(late), d), flat.dtype)
        _late_elems(flat, 0, d, a.strides[0] // es, 1, d, plan.offsets, plan.src, w, l, cf, late, plan.n_in, out)
        scratch = out.view(np.uint8)
    else:
        scratch = _late_rows_coded(a, type_id, plan, l, w, cf, late)
    saved, stage = np.empty_like(scratch), np.zeros(1, np.int64)
    undo.units.append((a, False, hbytes, fw, late, saved, None, stage))
    S.swap_rows(a, hbytes, fw, n_groups, stage)
    if len(late):
        S.write_late_rows(a, hbytes, late, scratch, saved, stage)


def _apply_layer_transposed(a: np.ndarray, type_id: int, plan: Plan, l: int, undo: InplaceUndo, kinds,
                            part) -> None:
    """One transposed V layer ``[n_embd_v_gqa, kv_size]`` (float16, float32, or bf16 bits as uint16) in place.
    bf16 merges decode the plan's input cells to float32 (exact), merge there and encode half-to-even.
    ``part``: the layer's :func:`~.inplace_swap.partition_plan` (16-bit types with VBMI2), else None: swaps."""
    n = plan.n_in
    if a.dtype == np.float16:
        a = as_kernel_array(a)
    d = a.shape[0] // plan.n_kv_head
    cf, fw, late = kinds
    rs = a.strides[0] // a.itemsize
    args = (plan.offsets, plan.src, plan.wv, l, cf, late, n)
    if not len(late):
        out = np.empty((0, d), a.dtype)
    elif type_id != _BF16:
        out = np.empty((len(late), d), a.dtype)
        _late_elems(a.reshape(-1), 0, d * rs, 1, rs, d, *args, out)
    elif (cf[late[:, 0], late[:, 1]] < 0).any():
        x = codec.bf16_bits_to_f32_array(a[:, :n])
        y = np.empty((len(late), d), np.float32)
        _late_elems(x.reshape(-1), 0, d * n, 1, n, d, *args, y)
        out = codec.f32_to_bf16_bits_array(y)
    else:  # bf16 copies only: raw bits
        out = np.empty((len(late), d), a.dtype)
        _late_elems(a.reshape(-1), 0, d * rs, 1, rs, d, *args, out)
    saved, stage = np.empty_like(out), np.zeros(1, np.int64)
    undo.units.append((a, True, d, fw, late, saved, None if part is None else (part, n), stage))
    if part is not None:  # selection heads: a stable partition with vpcompressw
        S.partition_elems(a, d, fw, part, n, stage)
    else:
        S.swap_elems(a, d, fw, stage)
    if len(late):
        S.write_late_elems(a, d, late, out, saved, stage)


def apply_inplace(k_layers, v_layers, plan: Plan, *, v_trans: bool, k_type: int, v_type: int,
                  undo: InplaceUndo | None = None, n_threads: int | None = None,
                  validated: bool = False) -> InplaceUndo:
    """Apply ``plan`` to the cache's own per-layer tensors in place: afterwards cells ``0..m-1`` of every layer
    hold the compacted K and V (cells ``m..`` hold a permutation of what the compaction moved out; the caller
    frees them).  Returns the :class:`InplaceUndo` (``undo``, filled, when given) that puts everything back.

    ``k_layers[l]``: uint8[kv_size, k_row_bytes]; ``v_layers[l]``: uint8[kv_size, v_row_bytes], or with
    ``v_trans`` the element-typed ``[n_embd_v_gqa, kv_size]`` matrix (float16/float32/uint16 bf16 bits).
    ``k_type``/``v_type``: ggml type ids.  The plan's input cells are cells ``0..plan.n_in-1``.
    ``n_threads``: Numba threads the row kernels split the heads over (default: ``numba.get_num_threads()``).
    ``validated``: the caller has just run ``plan.validate()`` (it costs ~5% of a compaction's time).
    """
    if not validated:
        plan.validate()
    _check(k_layers, v_layers, plan, v_trans)
    if TYPES[v_type].view is None and v_trans:
        raise ValueError("a quantized V cache is never transposed")
    undo = InplaceUndo() if undo is None else undo
    g = max(1, min(plan.n_kv_head, n_threads or get_num_threads()))
    kk = swap_plans(plan.offsets, plan.src, plan.wk, plan.n_in)
    kv = kk if plan.wv is plan.wk or np.array_equal(plan.wv, plan.wk) else \
        swap_plans(plan.offsets, plan.src, plan.wv, plan.n_in)

    def kinds(p, l):
        cf, fw, late, off = p
        return cf[l], fw[l], late[off[l]:off[l + 1]]

    H, parts = plan.n_kv_head, None
    if v_trans and HAS_VBMI2 and TYPES[v_type].block_bytes == 2:  # f16, bf16: every layer's heads at once
        parts = S.partition_plan(kv[0].reshape(-1, plan.m), kv[1].reshape(-1, plan.m), plan.n_in)
    for l in range(plan.n_layer):
        _apply_layer_rows(k_layers[l], k_type, plan, l, plan.wk, undo, g, kinds(kk, l))
        if v_trans:
            part = None if parts is None else tuple(x[l * H:(l + 1) * H] for x in parts)
            _apply_layer_transposed(v_layers[l], v_type, plan, l, undo, kinds(kv, l), part)
        else:
            _apply_layer_rows(v_layers[l], v_type, plan, l, plan.wv, undo, g, kinds(kv, l))
    return undo
