"""The data movement of compaction in place (CPU) as a permutation of the cache's own cells, so that it can be
undone exactly without an undo copy of the cache.

Per (layer, head) the plan's slots ``j < m`` fall in three kinds (``kernels.inplace._swap_plans`` sorts them),
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
ahead; ``n_groups`` splits the heads over Numba threads (heads are disjoint memory).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prefetch import prefetch

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
def swap_rows(raw, hbytes, fw, n_groups):  # pragma: no cover - compiled
    """The swaps of ``fw`` on ``raw`` uint8[kv_size, row_bytes] (C-contiguous), ascending slots, each of the
    ``n_groups`` threads over its share of the heads."""
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


@njit(cache=True, parallel=True)
def swap_elems(a, d, fw):  # pragma: no cover - compiled
    """The swaps of ``fw`` on a transposed ``a`` ``[H * d, kv_size]``: each element row of head ``h`` in turn
    (it stays in cache), the heads over the Numba threads.  (Scanning ``fw`` with a branch measured faster
    than a list of the swaps, and than gathering the net permutation from a copy of the row.)"""
    for h in prange(fw.shape[0]):
        for e in range(d):
            _permute_row(a[h * d + e], fw[h], False)


@njit(cache=True)
def unswap_elems(a, d, fw):
    """Undo :func:`swap_elems`."""
    for h in range(fw.shape[0]):
        for e in range(d):
            _permute_row(a[h * d + e], fw[h], True)


@njit(cache=True)
def write_late_rows(raw, hbytes, late, scratch, saved):
    """Late slot ``k`` = ``late[k]`` (head, slot) of ``raw`` uint8[kv_size, row_bytes]: its segment is saved to
    ``saved[k]`` and replaced by ``scratch[k]`` (both uint8[n_late, hbytes])."""
    for k in range(late.shape[0]):
        b = late[k, 0] * hbytes
        seg = raw[late[k, 1], b:b + hbytes]
        for i in range(hbytes):
            saved[k, i] = seg[i]
            seg[i] = scratch[k, i]


@njit(cache=True)
def restore_late_rows(raw, hbytes, late, saved):
    """Undo :func:`write_late_rows`."""
    for k in range(late.shape[0]):
        b = late[k, 0] * hbytes
        seg = raw[late[k, 1], b:b + hbytes]
        for i in range(hbytes):
            seg[i] = saved[k, i]


@njit(cache=True)
def write_late_elems(a, d, late, scratch, saved):
    """:func:`write_late_rows` on a transposed ``a`` ``[H * d, kv_size]``: ``scratch``/``saved`` ``[n_late, d]``
    in ``a``'s dtype."""
    for k in range(late.shape[0]):
        h, j = late[k, 0], late[k, 1]
        for e in range(d):
            saved[k, e] = a[h * d + e, j]
            a[h * d + e, j] = scratch[k, e]


@njit(cache=True)
def restore_late_elems(a, d, late, saved):
    """Undo :func:`write_late_elems`."""
    for k in range(late.shape[0]):
        h, j = late[k, 0], late[k, 1]
        for e in range(d):
            a[h * d + e, j] = saved[k, e]
