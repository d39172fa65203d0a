"""KVMerger merging-set identification (docs/ALGORITHMS.md, KVMerger step 3): consecutive runs of cells.

Both modes return ``(start, end)`` int32[L, H, m]: slot ``j`` of (l, h) stands for the run of cells
``start[l, h, j] : end[l, h, j]`` (ascending, disjoint; cells in no run are evicted).  Protected cells
(``prot`` bool[L, H, N]) are always singleton runs and never evicted.

- ``threshold_runs`` -- the paper's Algorithm 1: scanning from the end, a set grows by the next older
  cell while the adjacent cosine ``s_i = cos(k_i, k_{i+1}) > eps``.  [ours] more sets than ``m``: the
  lowest-evidence unprotected sets are evicted; fewer: the least similar merges are split back.
- ``budget_runs`` [ours] -- adjacency-constrained agglomerative clustering: repeatedly merge the adjacent
  pair of clusters whose representative keys (the member sums, i.e. means) have the highest cosine
  until ``m`` remain (an indexed binary heap of the live edges, O(N log N)); optionally refuse merges
  with cosine ``<= eps`` and evict the lowest-evidence clusters instead.

Tie rules (shared with the NumPy reference): edges with equal cosine split/merge the older first; sets
with equal evidence evict the older first.
"""
from __future__ import annotations

import logging

import numpy as np
import numba
from numba import njit, prange

from .strided import flat_view, load_row
from .select import pick_k
from .similarity import FAST

log = logging.getLogger(__name__)


@njit(cache=True)
def _evict_runs(rs, re, nr, prot, ev, m, out_s, out_e):
    """Keep ``m`` of the ``nr`` runs ``rs/re``: evict the lowest-evidence unprotected ones (older first)."""
    drop = np.zeros(nr, np.bool_)
    if nr > m:
        cand = np.empty(nr, np.int64)
        vals = np.empty(nr, np.float64)
        c = 0
        for r in range(nr):
            if not (re[r] - rs[r] == 1 and prot[rs[r]]):
                s = 0.0
                for i in range(rs[r], re[r]):
                    s += ev[i]
                cand[c] = r
                vals[c] = s
                c += 1
        picked = pick_k(vals[:c], nr - m, False, False)
        for t in range(c):
            if picked[t]:
                drop[cand[t]] = True
    k = 0
    for r in range(nr):
        if not drop[r]:
            out_s[k] = rs[r]
            out_e[k] = re[r]
            k += 1


@njit(cache=True, parallel=True)
def threshold_runs(cos, prot, evidence, m, eps):
    """Threshold-mode runs from adjacent cosines ``cos`` float32[L, H, N-1] (see the module docstring)."""
    L, H, N = prot.shape
    out_s = np.empty((L, H, m), np.int32)
    out_e = np.empty((L, H, m), np.int32)
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        p = prot[l, h]
        cut = np.zeros(max(N - 1, 0), np.bool_)
        ncut = 0
        for i in range(N - 1):
            if p[i] or p[i + 1] or not (cos[l, h, i] > eps):
                cut[i] = True
                ncut += 1
        if ncut + 1 < m:
            cand = np.empty(N - 1 - ncut, np.int64)
            c = 0
            for i in range(N - 1):
                if not cut[i]:
                    cand[c] = i
                    c += 1
            vals = np.empty(c, np.float32)
            for t in range(c):
                vals[t] = cos[l, h, cand[t]]
            picked = pick_k(vals, m - 1 - ncut, False, False)
            for t in range(c):
                if picked[t]:
                    cut[cand[t]] = True
            ncut = m - 1
        rs = np.empty(ncut + 1, np.int64)
        re = np.empty(ncut + 1, np.int64)
        r = 0
        rs[0] = 0
        for i in range(N - 1):
            if cut[i]:
                re[r] = i + 1
                r += 1
                rs[r] = i + 1
        re[r] = N
        _evict_runs(rs, re, ncut + 1, p, evidence[l, h], m, out_s[l, h], out_e[l, h])
    return out_s, out_e


@njit(cache=True, inline="always")
def _hbetter(pr, a, b):
    """Heap order of the edges keyed by their left cluster: higher cosine first, ties -> the older."""
    return pr[a] > pr[b] or (pr[a] == pr[b] and a < b)


@njit(cache=True, inline="always")
def _sift_up(hh, at, pr, i):
    x = hh[i]
    while i > 0:
        par = (i - 1) >> 1
        y = hh[par]
        if not _hbetter(pr, x, y):
            break
        hh[i] = y
        at[y] = i
        i = par
    hh[i] = x
    at[x] = i


@njit(cache=True, inline="always")
def _sift_down(hh, at, pr, n, i):
    x = hh[i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _hbetter(pr, hh[c + 1], hh[c]):
            c += 1
        y = hh[c]
        if not _hbetter(pr, y, x):
            break
        hh[i] = y
        at[y] = i
        i = c
    hh[i] = x
    at[x] = i


@njit(cache=True, inline="always")
def _heap_remove(hh, at, pr, n, a):
    """Remove edge ``a`` from the indexed heap of size ``n``; returns the new size."""
    i = at[a]
    at[a] = -1
    n -= 1
    if i < n:
        y = hh[n]
        hh[i] = y
        at[y] = i
        _sift_up(hh, at, pr, i)
        _sift_down(hh, at, pr, n, at[y])
    return n


@njit(cache=True, inline="always")
def _heap_update(hh, at, pr, n, a, prio):
    """Change the priority of edge ``a`` (in the heap) to ``prio``."""
    pr[a] = prio
    _sift_up(hh, at, pr, at[a])
    _sift_down(hh, at, pr, n, at[a])


@njit(cache=True, inline="always", fastmath=FAST)
def _cos(sums, n2, a, b):
    if n2[a] <= 0.0 or n2[b] <= 0.0:
        return 0.0
    dot = 0.0
    for e in range(sums.shape[1]):
        dot += sums[a, e] * sums[b, e]
    return dot / np.sqrt(n2[a] * n2[b])


@njit(cache=True, parallel=True, fastmath=FAST)
def budget_runs_flat(kflat, kgeom, prot, evidence, m, eps, refuse_below_eps, n_chunk):
    """Budget-mode runs by adjacency-constrained agglomerative clustering (see the module docstring).

    keys as (kflat, kgeom) (see :mod:`.strided`); prot bool[L, H, N]; evidence float32[L, H, N].
    Work buffers are allocated once per chunk of heads (``n_chunk`` chunks), not per head.  The live
    edges sit in an indexed binary heap keyed by their left cluster (one entry per edge, priorities
    updated in place: no stale entries), so every step pops exactly the merge it performs.
    """
    L, H, N, d = kgeom[5], kgeom[6], kgeom[7], kgeom[8]
    out_s = np.empty((L, H, m), np.int32)
    out_e = np.empty((L, H, m), np.int32)
    n_chunk = max(1, min(L * H, n_chunk))
    for c in prange(n_chunk):
        sums = np.empty((N, d), np.float64)
        n2 = np.empty(N, np.float64)
        row = np.empty(d, np.float32)
        end = np.empty(N, np.int64)
        nxt = np.empty(N, np.int64)
        prv = np.empty(N, np.int64)
        pr = np.empty(N, np.float64)
        hh = np.empty(N, np.int64)
        at = np.empty(N, np.int64)
        rs = np.empty(N, np.int64)
        re = np.empty(N, np.int64)
        for lh in range(c, L * H, n_chunk):
            l = lh // H
            h = lh - l * H
            p = prot[l, h]
            for i in range(N):
                load_row(kflat, kgeom, l, h, i, row)
                s = 0.0
                for e in range(d):
                    x = np.float64(row[e])
                    sums[i, e] = x
                    s += x * x
                n2[i] = s
                end[i] = i + 1
                nxt[i] = i + 1
                prv[i] = i - 1
                at[i] = -1
            n = 0
            for i in range(N - 1):
                if not p[i] and not p[i + 1]:
                    pr[i] = _cos(sums, n2, i, i + 1)
                    hh[n] = i
                    at[i] = n
                    n += 1
            for i in range(n // 2 - 1, -1, -1):
                _sift_down(hh, at, pr, n, i)
            ncl = N
            while ncl > m and n > 0:
                a = hh[0]
                if refuse_below_eps and not (pr[a] > eps):
                    break
                b = nxt[a]
                if at[b] >= 0:
                    n = _heap_remove(hh, at, pr, n, b)
                s = 0.0
                for e in range(d):
                    sums[a, e] += sums[b, e]
                    s += sums[a, e] * sums[a, e]
                n2[a] = s
                end[a] = end[b]
                nxt[a] = nxt[b]
                if nxt[b] < N:
                    prv[nxt[b]] = a
                ncl -= 1
                q = prv[a]
                if q >= 0 and not p[q]:
                    _heap_update(hh, at, pr, n, q, _cos(sums, n2, q, a))
                r = nxt[a]
                if r < N and not p[r]:
                    _heap_update(hh, at, pr, n, a, _cos(sums, n2, a, r))
                else:
                    n = _heap_remove(hh, at, pr, n, a)
            k = 0
            i = 0
            while i < N:
                rs[k] = i
                re[k] = end[i]
                k += 1
                i = end[i]
            _evict_runs(rs, re, ncl, p, evidence[l, h], m, out_s[l, h], out_e[l, h])
    return out_s, out_e


def budget_runs(keys, prot, evidence, m, eps, refuse_below_eps):
    """:func:`budget_runs_flat` for keys float16/float32 [L, H, N, d] of any strides."""
    return budget_runs_flat(*flat_view(keys, "keys"), prot, evidence, m, eps, refuse_below_eps,
                            4 * numba.get_num_threads())
