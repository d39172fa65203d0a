"""The one kernel that applies a compaction :class:`~kvmerge_local.plan.Plan` to a K or V cache.

``src``: ``[n_layer, n_kv_head, N, head_dim]`` and ``dst``: ``[n_layer, n_kv_head, m, head_dim]``, both
float32 or both float16 (passed to Numba as ``uint16`` bit views), any strides -- e.g. llama.cpp's
transposed V, where the cell axis has element stride 1.  For each (layer, head, slot), with ``w`` the
plan's ``wk`` (keys) or ``wv`` (values):

- *copy* -- exactly one source with a non-zero weight and that weight is 1: the raw element is moved
  (bit-exact; CaM's key slots, whose merged sources carry ``wk == 0``, are copies);
- *merge* -- ``sum_t w_t * x_t`` accumulated in float32 in source order (zero weights skipped), rounded
  once to the destination type (saturated to the finite f16 range).
"""
from __future__ import annotations

import logging

import numpy as np
from numba import njit, prange

from ..plan import Plan
from .f16 import load_math, store_row
from .strided import flat_view, row_offset

log = logging.getLogger(__name__)


@njit(cache=True)
def _copy_source(offsets, w, l, h, j):
    """Index into the flat arrays of the single unit-weight source of slot j, or -1 for a merge."""
    one = -1
    nz = 0
    for t in range(offsets[l, h, j], offsets[l, h, j + 1]):
        if w[t] != 0.0:
            nz += 1
            one = t
    if nz == 1 and w[one] == 1.0:
        return one
    return -1


CELL_BLOCK = 64  # transposed sources: cells converted together (one contiguous run per element row)
SLOT_BLOCK = 16  # transposed merges: slots rounded together before the element-row-wise write


@njit(cache=True)
def _merge_sources(offsets, psrc, w, l, h, copy_from, N):
    """(row_of int64[N], n_need, uses): the cells read by the merged slots of (l, h) (non-zero weights),
    numbered in cell order (``row_of[c] = -1`` when unread), and how many reads there are in all."""
    row_of = np.full(N, -1, np.int64)
    uses = 0
    for j in range(copy_from.shape[0]):
        if copy_from[j] < 0:
            for t in range(offsets[l, h, j], offsets[l, h, j + 1]):
                if w[t] != 0.0:
                    row_of[psrc[t]] = 0
                    uses += 1
    n_need = 0
    for c in range(N):
        if row_of[c] == 0:
            row_of[c] = n_need
            n_need += 1
    return row_of, n_need, uses


@njit(cache=True)
def _merge_rows(rows, row_of, dflat, dg, offsets, psrc, w, l, h, copy_from, acc):
    """Merged slots of (l, h) from the source rows gathered into ``rows[row_of[cell]]`` (raw elements, row
    major): the same arithmetic, in the same order, as merging straight from the cache.  Results are
    rounded into a block of ``SLOT_BLOCK`` rows, then written element row by element row (dst's cell
    axis is the contiguous one)."""
    d = acc.shape[0]
    m = copy_from.shape[0]
    blk = np.empty(SLOT_BLOCK * d, dflat.dtype)
    slots = np.empty(SLOT_BLOCK, np.int64)
    nb = 0
    db = row_offset(dg, l, h, 0)
    for j in range(m + 1):
        if j < m and copy_from[j] < 0:
            first = True
            for t in range(offsets[l, h, j], offsets[l, h, j + 1]):
                wt = w[t]
                if wt == 0.0:
                    continue
                r = rows[row_of[psrc[t]]]
                if first:
                    for e in range(d):
                        acc[e] = wt * load_math(r[e])
                else:
                    for e in range(d):
                        acc[e] += wt * load_math(r[e])
                first = False
            if first:
                for e in range(d):
                    acc[e] = 0.0
            store_row(acc, blk, nb * d, 1)
            slots[nb] = j
            nb += 1
        if nb == SLOT_BLOCK or (j == m and nb > 0):
            for e in range(d):
                o = db + e * dg[4]
                for k in range(nb):
                    dflat[o + slots[k] * dg[3]] = blk[k * d + e]
            nb = 0


@njit(cache=True)
def _apply_columns(sflat, sg, dflat, dg, offsets, psrc, w, l, h, copy_from, acc):
    """One (l, h) when the source's cell axis is contiguous (llama.cpp's transposed V).  Copies go column
    by column (one contiguous run of N cells each).  For merges, the cells they read are first transposed
    into rows (blocks of ``CELL_BLOCK`` cells, each element row read as one contiguous run), merged as on
    the row path (vectorized over d, same per-element arithmetic and order) and written back in blocks
    of ``SLOT_BLOCK`` slots (see :func:`_merge_rows`)."""
    d, N = sg[8], sg[7]
    m = dg[7]
    sb = row_offset(sg, l, h, 0)
    db = row_offset(dg, l, h, 0)
    n_merge = 0
    for j in range(m):
        n_merge += copy_from[j] < 0
    for e in range(d):
        col = sflat[sb + e * sg[4]:sb + e * sg[4] + N]
        o = db + e * dg[4]
        for j in range(m):
            s = copy_from[j]
            if s >= 0:
                dflat[o + j * dg[3]] = col[s]
    if n_merge == 0:
        return
    row_of, n_need, uses = _merge_sources(offsets, psrc, w, l, h, copy_from, N)
    rows = np.empty((n_need, d), sflat.dtype)  # the merged slots' sources, transposed once
    for c0 in range(0, N, CELL_BLOCK):
        c1 = min(c0 + CELL_BLOCK, N)
        for e in range(d):
            col = sflat[sb + e * sg[4] + c0:sb + e * sg[4] + c1]
            for c in range(c1 - c0):
                r = row_of[c0 + c]
                if r >= 0:
                    rows[r, e] = col[c]
    _merge_rows(rows, row_of, dflat, dg, offsets, psrc, w, l, h, copy_from, acc)


@njit(cache=True, parallel=True)
def apply_plan_kernel(sflat, sg, dflat, dg, offsets, psrc, w):
    """Fill dst from src following the CSR plan (offsets int64[L, H, m+1], psrc int32[nnz], w float32[nnz]).

    ``sflat/sg`` and ``dflat/dg``: flat views and geometries (see :mod:`.strided`) of src [L, H, N, d]
    and dst [L, H, m, d], both float32 or both f16 bits (uint16).  Rows are moved with unit-stride loops
    when the head_dim axis is contiguous, column by column when the cell axis is (transposed V), else
    with generic strided indexing.  (Merging from float32 copies of often-read rows does not pay on the
    row path: f16 rows plus ``vcvtph2ps`` move half the bytes.)
    """
    L, H, d = sg[5], sg[6], sg[8]
    m = dg[7]
    rows = sg[4] == 1 and dg[4] == 1
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        acc = np.empty(d, np.float32)
        copy_from = np.empty(m, np.int64)
        for j in range(m):
            t = _copy_source(offsets, w, l, h, j)
            copy_from[j] = psrc[t] if t >= 0 else -1
        if not rows and sg[3] == 1:
            _apply_columns(sflat, sg, dflat, dg, offsets, psrc, w, l, h, copy_from, acc)
            continue
        if rows:
            for j in range(m):
                s = copy_from[j]
                if s >= 0:
                    so = row_offset(sg, l, h, s)
                    do = row_offset(dg, l, h, j)
                    srow = sflat[so:so + d]
                    drow = dflat[do:do + d]
                    for e in range(d):
                        drow[e] = srow[e]
        else:
            sb = row_offset(sg, l, h, 0)
            db = row_offset(dg, l, h, 0)
            for e in range(d):
                for j in range(m):
                    s = copy_from[j]
                    if s >= 0:
                        dflat[db + j * dg[3] + e * dg[4]] = sflat[sb + s * sg[3] + e * sg[4]]
        for j in range(m):
            if copy_from[j] >= 0:
                continue
            first = True  # the first non-zero source initializes acc (no separate zeroing pass)
            for t in range(offsets[l, h, j], offsets[l, h, j + 1]):
                wt = w[t]
                if wt == 0.0:
                    continue
                so = row_offset(sg, l, h, psrc[t])
                if sg[4] == 1:
                    srow = sflat[so:so + d]
                    if first:
                        for e in range(d):
                            acc[e] = wt * load_math(srow[e])
                    else:
                        for e in range(d):
                            acc[e] += wt * load_math(srow[e])
                else:
                    if first:
                        for e in range(d):
                            acc[e] = wt * load_math(sflat[so + e * sg[4]])
                    else:
                        for e in range(d):
                            acc[e] += wt * load_math(sflat[so + e * sg[4]])
                first = False
            if first:
                for e in range(d):
                    acc[e] = 0.0
            store_row(acc, dflat, row_offset(dg, l, h, j), dg[4])


def _check(src: np.ndarray, dst: np.ndarray, plan: Plan) -> None:
    if src.ndim != 4 or dst.ndim != 4:
        raise ValueError(f"src and dst must be 4-D [n_layer, n_kv_head, cells, head_dim], got {src.shape}, {dst.shape}")
    L, H, N, d = src.shape
    if N != plan.n_in or (L, H) != (plan.n_layer, plan.n_kv_head):
        raise ValueError(f"src shape {src.shape} does not match the plan ({plan.n_layer}, {plan.n_kv_head}, {plan.n_in})")
    if dst.shape != (L, H, plan.m, d):
        raise ValueError(f"dst shape {dst.shape} != {(L, H, plan.m, d)}")
    if src.dtype != dst.dtype:
        raise ValueError(f"src and dst dtypes differ: {src.dtype} vs {dst.dtype}")
    if not dst.flags.writeable:
        raise ValueError("dst is read-only")


def apply_plan(src: np.ndarray, dst: np.ndarray, plan: Plan, which: str = "k") -> np.ndarray:
    """Apply ``plan`` to ``src`` writing ``dst`` in place; ``which`` selects the weights: "k" (wk) or "v" (wv).

    src [L, H, N, d], dst [L, H, m, d]: both float16 or both float32, any strides.  Returns ``dst``.
    """
    if which not in ("k", "v"):
        raise ValueError(f"which must be 'k' or 'v', got {which!r}")
    _check(src, dst, plan)
    if src.size == 0 or dst.size == 0:
        return dst
    sflat, sg = flat_view(src, "src")
    dflat, dg = flat_view(dst, "dst")
    apply_plan_kernel(sflat, sg, dflat, dg, plan.offsets, plan.src, plan.wk if which == "k" else plan.wv)
    return dst


def apply_plan_keys(src: np.ndarray, dst: np.ndarray, plan: Plan) -> np.ndarray:
    """:func:`apply_plan` with the key weights ``wk``."""
    return apply_plan(src, dst, plan, "k")


def apply_plan_values(src: np.ndarray, dst: np.ndarray, plan: Plan) -> np.ndarray:
    """:func:`apply_plan` with the value weights ``wv``."""
    return apply_plan(src, dst, plan, "v")
