"""Compaction in place on the KV cache's own memory (CPU): the plan rewrites cells ``0..m-1`` of every layer.

The arrays are laid out like llama.cpp's cache tensors (one per layer; see ``KVBridge``'s ``CacheTensors``):

- K, and V when not transposed: ``uint8[kv_size, row_bytes]``, a row is ``[head 0 | head 1 | ...]`` (``head_dim``
  elements, or the q8_0/q4_0 blocks of ``head_dim`` elements, per head);
- V transposed (flash attention off): element-typed ``[n_embd_v_gqa, kv_size]`` (float16, float32, or bf16 as
  ``uint16``): row ``h * head_dim + e`` holds element ``e`` of head ``h`` for every cell.

The plan's input cells are cells ``0..n_in-1`` in order; output slot ``j`` lands in cell ``j``.  Per (layer,
head), with ``s_j`` the source cell of a copy slot:

1. *late* slots -- merges, and copies with ``s_j < j`` (a forward pass would already have overwritten their
   source) -- are computed first, from the untouched cache, into a small scratch buffer;
2. the other copies (``s_j >= j``; every copy of a selection plan, whose kept cells ascend) move forward in
   ascending ``j``: writing cell ``j`` can only clobber a cell ``<= j``, which no later copy reads;
3. the scratch rows are written to their slots.

The arithmetic is the state path's (:mod:`.apply`): copies move raw elements/blocks (bit-exact); float merges
accumulate ``w * x`` in float32 in source order, zero weights skipped, rounded once by ``store_row`` (f16, f32); bf16 rows go through the codec like the
quantized types: merges dequantize only the rows they read, merge in float32 and re-encode only the merged rows
(:mod:`kvmerge_local.codec`; bf16 rounds half-to-even), as the state path does; a transposed bf16 V layer is
decoded to float32 (exact), compacted there and encoded back (copies round-trip bit for bit).  So the cache afterwards holds, bit for bit, what
applying the same plan to the state blob writes.  Nothing here knows llama.cpp.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import codec
from ..codec.types import TYPE_IDS, TYPES
from ..plan import Plan
from .apply import _copy_source
from .f16 import as_kernel_array, load_math, store_row

_BF16 = TYPE_IDS["bf16"]


@njit(cache=True)
def _copy_from(offsets, psrc, w, l, h, m):
    """int64[m]: the source cell of each copy slot of (l, h), -1 for a merged slot (rule of :mod:`.apply`)."""
    out = np.empty(m, np.int64)
    off = offsets[l, h]
    for j in range(m):
        t0 = off[j]
        if off[j + 1] - t0 == 1:  # one source: a copy exactly when its weight is 1 (as _copy_source)
            out[j] = psrc[t0] if w[t0] == 1.0 else -1
        else:
            t = _copy_source(offsets, w, l, h, j)
            out[j] = psrc[t] if t >= 0 else -1
    return out


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


@njit(cache=True, parallel=True)
def _inplace_elems(flat, base, hs, cs, es, H, d, offsets, psrc, w, l, m, n_in):  # pragma: no cover - compiled
    """Float cache (f32, or f16 as uint16 bits), one layer: element ``e`` of head ``h`` of cell ``c`` is
    ``flat[base + h*hs + c*cs + e*es]``.  Rows when ``es == 1``, transposed V when ``cs == 1``."""
    cf = np.empty((H, m), np.int64)
    start = np.zeros(H + 1, np.int64)
    for h in range(H):
        cf[h] = _copy_from(offsets, psrc, w, l, h, m)
        n = 0
        for j in range(m):
            if cf[h, j] < j:
                n += 1
        start[h + 1] = start[h] + n
    late = np.empty((start[H], d), flat.dtype)
    late_slot = np.empty(start[H], np.int64)
    for h in prange(H):
        hb = base + h * hs
        acc = np.empty(d, np.float32)
        n_merge = 0
        for j in range(m):
            n_merge += cf[h, j] < 0
        cell_off = hb + np.arange(n_in if n_merge else 0) * cs  # where each input cell starts (merges only)
        k = start[h]
        for j in range(m):  # 1. late slots, from the untouched cache
            s = cf[h, j]
            if s >= j:
                continue
            late_slot[k] = j
            row = late[k]
            if s >= 0:
                o = hb + s * cs
                for e in range(d):
                    row[e] = flat[o + e * es]
            else:
                _merge_slot(flat, cell_off, es, offsets, psrc, w, l, h, j, acc)
                store_row(acc, row, 0, 1)
            k += 1
        if es == 1:  # 2. forward copies (heads are disjoint memory: each head's late slots are saved)
            for j in range(m):
                s = cf[h, j]
                if s > j:
                    srow = flat[hb + s * cs:hb + s * cs + d]
                    drow = flat[hb + j * cs:hb + j * cs + d]
                    for e in range(d):
                        drow[e] = srow[e]
        else:  # transposed: one contiguous element row at a time
            for e in range(d):
                eo = hb + e * es
                for j in range(m):
                    s = cf[h, j]
                    if s > j:
                        flat[eo + j * cs] = flat[eo + s * cs]
    for h in prange(H):
        hb = base + h * hs
        for k in range(start[h], start[h + 1]):  # 3. late rows into their slots
            o = hb + late_slot[k] * cs
            row = late[k]
            if es == 1:
                drow = flat[o:o + d]
                for e in range(d):
                    drow[e] = row[e]
            else:
                for e in range(d):
                    flat[o + e * es] = row[e]


@njit(cache=True)
def _late_plan(offsets, psrc, w, l, H, m):
    """For a quantized layer: ``cf`` int64[H, m] (copy sources, -1 merged) and the late slots as
    ``(head, slot)`` int64[n_late, 2]."""
    cf = np.empty((H, m), np.int64)
    n_late = 0
    for h in range(H):
        cf[h] = _copy_from(offsets, psrc, w, l, h, m)
        for j in range(m):
            if cf[h, j] < j:
                n_late += 1
    late = np.empty((n_late, 2), np.int64)
    k = 0
    for h in range(H):
        for j in range(m):
            if cf[h, j] < j:
                late[k, 0] = h
                late[k, 1] = j
                k += 1
    return cf, late


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


@njit(cache=True, parallel=True)
def _forward_blocks(raw, hbytes, cf):  # pragma: no cover - compiled
    """Quantized rows ``raw`` uint8[kv_size, row_bytes]: forward copies of each head's ``hbytes`` raw bytes."""
    H, m = cf.shape
    for h in prange(H):
        b = h * hbytes
        for j in range(m):
            s = cf[h, j]
            if s > j:
                srow = raw[s, b:b + hbytes]
                drow = raw[j, b:b + hbytes]
                for i in range(hbytes):
                    drow[i] = srow[i]


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


def _apply_layer_rows(a: np.ndarray, type_id: int, plan: Plan, l: int, w: np.ndarray) -> None:
    """One layer's K (or non-transposed V) ``uint8[kv_size, row_bytes]`` in place."""
    H, m = plan.n_kv_head, plan.m
    t = TYPES[type_id]
    hbytes = a.shape[1] // H
    if t.view is not None and type_id != _BF16:
        es = t.block_bytes
        flat = a.reshape(-1).view(np.float32 if t.view is np.float32 else np.uint16)
        d = hbytes // es
        _inplace_elems(flat, 0, d, a.strides[0] // es, 1, H, d, plan.offsets, plan.src, w, l, m, plan.n_in)
        return
    d = codec.n_elems_of_row(type_id, hbytes)
    cf, late = _late_plan(plan.offsets, plan.src, w, l, H, m)
    scratch = np.empty((len(late), hbytes), np.uint8)
    is_copy = cf[late[:, 0], late[:, 1]] >= 0 if len(late) else np.zeros(0, bool)
    if is_copy.any():
        hc, jc = late[is_copy, 0], late[is_copy, 1]
        src = cf[hc, jc]
        for h in np.unique(hc):
            sel = hc == h
            scratch[is_copy.nonzero()[0][sel]] = a[src[sel], h * hbytes:(h + 1) * hbytes]
    if (~is_copy).any():
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
    _forward_blocks(a, hbytes, cf)
    for h in np.unique(late[:, 0]) if len(late) else ():
        sel = late[:, 0] == h
        a[late[sel, 1], h * hbytes:(h + 1) * hbytes] = scratch[sel]


def _apply_bf16_transposed(a: np.ndarray, plan: Plan, l: int) -> None:
    """One transposed bf16 V layer ``uint16[n_embd_v_gqa, kv_size]`` (bf16 bits): decoded to float32 for the
    plan's input cells (exact), compacted there with the float kernel, encoded back half-to-even."""
    H, n = plan.n_kv_head, plan.n_in
    x = codec.bf16_bits_to_f32_array(a[:, :n])
    d = x.shape[0] // H
    _inplace_elems(x.reshape(-1), 0, d * n, 1, n, H, d, plan.offsets, plan.src, plan.wv, l, plan.m, n)
    a[:, :plan.m] = codec.f32_to_bf16_bits_array(np.ascontiguousarray(x[:, :plan.m]))


def apply_inplace(k_layers, v_layers, plan: Plan, *, v_trans: bool, k_type: int, v_type: int) -> None:
    """Apply ``plan`` to the cache's own per-layer tensors in place: afterwards cells ``0..m-1`` of every layer
    hold the compacted K and V (cells ``m..`` are left as they were; the caller frees them).

    ``k_layers[l]``: uint8[kv_size, k_row_bytes]; ``v_layers[l]``: uint8[kv_size, v_row_bytes], or with
    ``v_trans`` the element-typed ``[n_embd_v_gqa, kv_size]`` matrix (float16/float32/uint16 bf16 bits).
    ``k_type``/``v_type``: ggml type ids.  The plan's input cells are cells ``0..plan.n_in-1``.
    """
    plan.validate()
    _check(k_layers, v_layers, plan, v_trans)
    if TYPES[v_type].view is None and v_trans:
        raise ValueError("a quantized V cache is never transposed")
    H, m = plan.n_kv_head, plan.m
    for l in range(plan.n_layer):
        _apply_layer_rows(k_layers[l], k_type, plan, l, plan.wk)
        if not v_trans:
            _apply_layer_rows(v_layers[l], v_type, plan, l, plan.wv)
            continue
        if v_type == _BF16:
            _apply_bf16_transposed(v_layers[l], plan, l)
            continue
        a = as_kernel_array(v_layers[l]) if v_layers[l].dtype == np.float16 else v_layers[l]
        es = a.itemsize
        n_embd, kv = a.shape
        d = n_embd // H
        flat = a.reshape(-1)
        rs = a.strides[0] // es
        _inplace_elems(flat, 0, d * rs, 1, rs, H, d, plan.offsets, plan.src, plan.wv, l, m, plan.n_in)


@njit(cache=True)
def _first_change(offsets, psrc, wk, wv, L, H, m):
    out = np.full(L, m, np.int64)
    for l in range(L):
        for h in range(H):
            for w in (wk, wv):
                for j in range(min(m, out[l])):  # up to the first slot that is not its own cell
                    t = _copy_source(offsets, w, l, h, j)
                    if t < 0 or psrc[t] != j:
                        out[l] = j
                        break
    return out


def changed_from(plan: Plan) -> np.ndarray:
    """int64[n_layer]: per layer the first cell in-place application may write (``m`` when none): cells before
    it hold their own source, unchanged, in every head, for K and V."""
    L, H, m = plan.pos.shape
    return _first_change(plan.offsets, plan.src, plan.wk, plan.wv, L, H, m)
