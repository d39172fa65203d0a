"""The data movement of compaction in place (CPU) as a permutation of the cache's own cells, so that it can be
undone exactly without an undo copy of the cache.

Per (layer, head) the plan's slots ``j < m`` fall in three kinds (``kernels.inplace.swap_plans`` sorts them),
with ``s_j`` the source cell of a copy slot:

- *identity*: ``s_j == j``, nothing moves;
- *swap*: ``s_j > j`` and no other copy slot reads cell ``s_j``: cell ``j``'s segment and cell ``s_j``'s are
  **exchanged** (in ascending ``j``; cells ``>= m`` are freed afterwards, so what lands there is free to keep);
  a later swap never reads a cell an earlier one wrote, so each slot gets its source's original content;
- *late*: merges, copies from a cell ``< j``, copies of a cell read by several slots: computed first from the
  untouched cache into a scratch buffer by the caller, then written over their slots, whose current content is
  saved first (``saved``: as many segments as there are late slots -- none for a selection plan).

Undo = put the saved segments back, then repeat the swaps in descending ``j`` (:func:`unswap_rows`,
:func:`unswap_elems`): the cache is bit for bit what it was.  The swaps cost about what copies cost (the
exchanged source segment is already in cache); no extra memory is touched.

Layouts (as :mod:`.inplace`): ``raw`` ``uint8[kv_size, row_bytes]`` rows of ``H`` segments of ``hbytes``
bytes (any type: segments move as raw bytes), or ``a`` element-typed ``[H * d, kv_size]`` (transposed V: row
``h * d + e`` is element ``e`` of head ``h`` for every cell).  The row kernels visit slots in order across the
heads (the sources of one slot's heads lie close together) and prefetch the sources ``PREFETCH_SLOTS`` slots
ahead; ``n_groups`` splits the heads over Numba threads (heads are disjoint memory).  A transposed 16-bit layer's
selection heads are *partitioned* instead of swapped (:func:`partition_elems`: kept cells first, in order, with
``vpcompressw``; :func:`unpartition_elems` undoes it).  Every kernel that writes ends by setting ``stage[0]``, so
an undo recorded before the call knows whether it ran.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .intrinsics import compress32_u16, prefetch

_ALL = np.uint32(0xFFFFFFFF)  # a compress of every lane: a plain 32-element copy
PREFETCH_SLOTS = 4  # how many slots ahead the row kernels prefetch their sources (best of 2..16 measured)


@njit(cache=True)
def _exchange(raw, j, s, b, n):
    """Exchange bytes ``b..b+n-1`` of rows ``j`` and ``s`` of ``raw``."""
    d = raw[j, b:b + n]
    x = raw[s, b:b + n]
    for i in range(n):
        t = d[i]
        d[i] = x[i]
        x[i] = t


@njit(cache=True, parallel=True)
def swap_rows(raw, hbytes, fw, n_groups, stage):  # pragma: no cover - compiled
    """The swaps of ``fw`` on ``raw`` uint8[kv_size, row_bytes] (C-contiguous), ascending slots, each of the
    ``n_groups`` threads over its share of the heads; then ``stage[0] = 1`` (int64[1]: what an undo recorded
    before the call needs to know -- a Python exception cannot land between the swaps and this mark)."""
    H, m = fw.shape
    rb = raw.shape[1]
    flat = raw.reshape(-1)
    for g in prange(n_groups):
        h0, h1 = g * H // n_groups, (g + 1) * H // n_groups
        for j in range(m):
            jp = j + PREFETCH_SLOTS
            if jp < m:
                for h in range(h0, h1):
                    s = fw[h, jp]
                    if s >= 0:
                        o = s * rb + h * hbytes
                        for q in range(0, hbytes, 64):
                            prefetch(flat, o + q)
                        prefetch(flat, o + hbytes - 1)
            for h in range(h0, h1):
                if fw[h, j] >= 0:
                    _exchange(raw, j, fw[h, j], h * hbytes, hbytes)
    stage[0] = 1


@njit(cache=True)
def unswap_rows(raw, hbytes, fw):
    """Undo :func:`swap_rows`: the same exchanges in descending slot order."""
    H, m = fw.shape
    for j in range(m - 1, -1, -1):
        for h in range(H):
            if fw[h, j] >= 0:
                _exchange(raw, j, fw[h, j], h * hbytes, hbytes)


@njit(cache=True)
def _permute_row(r, c, reverse):
    """Exchange ``r[j]`` and ``r[c[j]]`` for every ``c[j] >= 0``, ascending ``j`` (descending: ``reverse``)."""
    m = c.shape[0]
    for q in range(m):
        j = m - 1 - q if reverse else q
        s = c[j]
        if s >= 0:
            t = r[j]
            r[j] = r[s]
            r[s] = t


@njit(cache=True)
def _permute_head(a, d, fw, h, reverse):
    """:func:`_permute_row` on each of head ``h``'s ``d`` element rows of a transposed ``a``."""
    for e in range(d):
        _permute_row(a[h * d + e], fw[h], reverse)


@njit(cache=True, parallel=True)
def swap_elems(a, d, fw, stage):  # pragma: no cover - compiled
    """The swaps of ``fw`` on a transposed ``a`` ``[H * d, kv_size]``: each element row of head ``h`` in turn
    (it stays in cache), the heads over the Numba threads.  (Scanning ``fw`` with a branch measured faster
    than a list of the swaps, and than gathering the net permutation from a copy of the row.)  Then
    ``stage[0] = 1``."""
    for h in prange(fw.shape[0]):
        _permute_head(a, d, fw, h, False)
    stage[0] = 1


@njit(cache=True)
def unswap_elems(a, d, fw):
    """Undo :func:`swap_elems`."""
    for h in range(fw.shape[0]):
        _permute_head(a, d, fw, h, True)


@njit(cache=True)
def partition_plan(cf, fw, n):
    """For a transposed 16-bit layer, the heads whose swaps may be replaced by a *stable partition* of cells
    ``0..n-1`` (no late slot, copy sources ascending -- a selection): cells kept, in order, to slots ``0..m-1``,
    the others, in order, after them.  ``lo`` int64[H]: where the partition starts, a multiple of 32 (-1: the
    head swaps); ``keep``/``drop`` uint32[H, W] bit ``c % 32`` of word ``c // 32`` set for a kept / other cell
    ``>= lo`` below ``n``; ``n_keep``/``n_drop`` int64[H, W] their counts per word."""
    H, m = cf.shape
    W = (n + 31) // 32
    lo = np.full(H, -1, np.int64)
    keep = np.zeros((H, W), np.uint32)
    drop = np.zeros((H, W), np.uint32)
    n_keep = np.zeros((H, W), np.int64)
    n_drop = np.zeros((H, W), np.int64)
    for h in range(H):
        first, prev, ok = m, -1, True
        for j in range(m):
            s = cf[h, j]
            if (s != j and fw[h, j] < 0) or s <= prev:
                ok = False
                break
            prev = s
            if s != j and first == m:
                first = j
        if not ok:
            continue
        c0 = first // 32 * 32
        lo[h] = c0
        kw = np.zeros(W, np.int64)
        for j in range(m):
            c = cf[h, j]
            if c >= c0:
                kw[c >> 5] |= np.int64(1) << (c & 31)
                n_keep[h, c >> 5] += 1
        for wi in range(c0 >> 5, W):
            width = min(n - wi * 32, 32)
            keep[h, wi] = np.uint32(kw[wi])
            drop[h, wi] = np.uint32(((np.int64(1) << width) - 1) & ~kw[wi])
            n_drop[h, wi] = width - n_keep[h, wi]
    return lo, keep, drop, n_keep, n_drop


@njit(cache=True)
def _is_kept(keep, h, c):
    """1 when cell ``c`` of head ``h`` is kept (bit ``c % 32`` of ``keep[h, c // 32]``), else 0."""
    return np.int64((keep[h, c >> 5] >> np.uint32(c & 31)) & np.uint32(1))


@njit(cache=True, parallel=True)
def partition_elems(a, d, fw, part, n, stage):  # pragma: no cover - compiled
    """:func:`swap_elems` on a 16-bit transposed ``a`` (uint16 ``[H * d, kv_size]``), with the heads that
    allow it (:func:`partition_plan`, ``part``) stably partitioned instead: per 32 cells one compress-store of
    the others to a scratch row and one of the kept in place (``vpcompressw`` where the CPU has it), then the
    others copied after the kept.  Same slots ``0..m-1``, another permutation of the rest:
    :func:`unpartition_elems` undoes it.  Then ``stage[0] = 1``."""
    lo, keep, drop, n_keep, n_drop = part
    for h in prange(fw.shape[0]):
        c0 = lo[h]
        if c0 < 0:
            _permute_head(a, d, fw, h, False)
            continue
        tmp = np.empty(n - c0 + 32, np.uint16)
        n_full = c0 + (n - c0) // 32 * 32
        for e in range(d):
            r = a[h * d + e]
            k, o, c = c0, 0, c0
            while c < n_full:
                wi = c >> 5
                compress32_u16(tmp, o, r, c, drop[h, wi])  # first: the kept store below may overwrite these
                compress32_u16(r, k, r, c, keep[h, wi])
                o += n_drop[h, wi]
                k += n_keep[h, wi]
                c += 32
            for c in range(n_full, n):  # the last cells one by one
                kept = _is_kept(keep, h, c)
                r[k] = r[c]  # (a dropped cell's copy here is overwritten: k stays)
                tmp[o] = r[c]
                k += kept
                o += 1 - kept
            i = 0
            while i + 32 <= o:  # the others after the kept, 32 at a time (a scalar loop measured 3x slower)
                compress32_u16(r, k + i, tmp, i, _ALL)
                i += 32
            for i in range(i, o):
                r[k + i] = tmp[i]
    stage[0] = 1


@njit(cache=True)
def unpartition_elems(a, d, fw, part, n):
    """Undo :func:`partition_elems`."""
    lo, keep = part[0], part[1]
    m = fw.shape[1]
    for h in range(fw.shape[0]):
        c0 = lo[h]
        if c0 < 0:
            _permute_head(a, d, fw, h, True)
            continue
        for e in range(d):
            r = a[h * d + e]
            tmp = r[c0:n].copy()
            ki, oi = 0, m - c0
            for c in range(c0, n):
                if _is_kept(keep, h, c):
                    r[c] = tmp[ki]
                    ki += 1
                else:
                    r[c] = tmp[oi]
                    oi += 1


@njit(cache=True)
def write_late_rows(raw, hbytes, late, scratch, saved, stage):
    """Late slot ``k`` = ``late[k]`` (head, slot) of ``raw`` uint8[kv_size, row_bytes]: its segment is saved to
    ``saved[k]`` and replaced by ``scratch[k]`` (both uint8[n_late, hbytes]); then ``stage[0] = 2``."""
    for k in range(late.shape[0]):
        b = late[k, 0] * hbytes
        seg = raw[late[k, 1], b:b + hbytes]
        for i in range(hbytes):
            saved[k, i] = seg[i]
            seg[i] = scratch[k, i]
    stage[0] = 2


@njit(cache=True)
def restore_late_rows(raw, hbytes, late, saved):
    """Undo :func:`write_late_rows`."""
    for k in range(late.shape[0]):
        b = late[k, 0] * hbytes
        seg = raw[late[k, 1], b:b + hbytes]
        for i in range(hbytes):
            seg[i] = saved[k, i]


@njit(cache=True)
def write_late_elems(a, d, late, scratch, saved, stage):
    """:func:`write_late_rows` on a transposed ``a`` ``[H * d, kv_size]``: ``scratch``/``saved`` ``[n_late, d]``
    in ``a``'s dtype."""
    for k in range(late.shape[0]):
        h, j = late[k, 0], late[k, 1]
        for e in range(d):
            saved[k, e] = a[h * d + e, j]
            a[h * d + e, j] = scratch[k, e]
    stage[0] = 2


@njit(cache=True)
def restore_late_elems(a, d, late, saved):
    """Undo :func:`write_late_elems`."""
    for k in range(late.shape[0]):
        h, j = late[k, 0], late[k, 1]
        for e in range(d):
            a[h * d + e, j] = saved[k, e]
