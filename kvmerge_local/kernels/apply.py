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
from .f16 import load, store, store_row
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


@njit(cache=True)
def _apply_columns(sflat, sg, dflat, dg, offsets, psrc, w, l, h, copy_from):
    """One (l, h) when the source's cell axis is contiguous (llama.cpp's transposed V): for each of the
    d columns, copies and merges read one contiguous run of N cells (cache friendly)."""
    d, N = sg[8], sg[7]
    m = dg[7]
    sb = row_offset(sg, l, h, 0)
    db = row_offset(dg, l, h, 0)
    for e in range(d):
        col = sflat[sb + e * sg[4]:sb + e * sg[4] + N]
        o = db + e * dg[4]
        for j in range(m):
            s = copy_from[j]
            if s >= 0:
                dflat[o + j * dg[3]] = col[s]
                continue
            acc = np.float32(0.0)
            first = True
            for t in range(offsets[l, h, j], offsets[l, h, j + 1]):
                wt = w[t]
                if wt != 0.0:
                    x = wt * load(col[psrc[t]])
                    acc = x if first else acc + x
                    first = False
            dflat[o + j * dg[3]] = store(acc, dflat)


@njit(cache=True, parallel=True)
def apply_plan_kernel(sflat, sg, dflat, dg, offsets, psrc, w):
    """Fill dst from src following the CSR plan (offsets int64[L, H, m+1], psrc int32[nnz], w float32[nnz]).

    ``sflat/sg`` and ``dflat/dg``: flat views and geometries (see :mod:`.strided`) of src [L, H, N, d]
    and dst [L, H, m, d], both float32 or both f16 bits (uint16).  Rows are moved with unit-stride loops
    when the head_dim axis is contiguous, column by column when the cell axis is (transposed V), else
    with generic strided indexing.
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
            _apply_columns(sflat, sg, dflat, dg, offsets, psrc, w, l, h, copy_from)
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
                            acc[e] = wt * load(srow[e])
                    else:
                        for e in range(d):
                            acc[e] += wt * load(srow[e])
                else:
                    if first:
                        for e in range(d):
                            acc[e] = wt * load(sflat[so + e * sg[4]])
                    else:
                        for e in range(d):
                            acc[e] += wt * load(sflat[so + e * sg[4]])
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
