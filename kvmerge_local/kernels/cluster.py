"""KVMerger merging-set identification (ALGORITHMS.md, KVMerger step 3): consecutive runs of cells.

Both modes return ``(start, end)`` int32[L, H, m]: slot ``j`` of (l, h) stands for the run of cells
``start[l, h, j] : end[l, h, j]`` (ascending, disjoint; cells in no run are evicted).  Protected cells
(``prot`` bool[L, H, N]) are always singleton runs and never evicted.

- ``threshold_runs`` -- the paper's Algorithm 1: scanning from the end, a set grows by the next older
  cell while the adjacent cosine ``s_i = cos(k_i, k_{i+1}) > eps``.  [ours] more sets than ``m``: the
  lowest-evidence unprotected sets are evicted; fewer: the least similar merges are split back.
- ``budget_runs`` [ours] -- adjacency-constrained agglomerative clustering: repeatedly merge the adjacent
  pair of clusters whose representative keys (the member sums, i.e. means) have the highest cosine
  until ``m`` remain (binary heap with lazy invalidation, O(N log N) pushes); optionally refuse merges
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


@njit(cache=True)
def _better(hp, hid, ea, i, j):
    """Heap order: higher cosine first, ties -> the older (smaller left cluster) pair."""
    return hp[i] > hp[j] or (hp[i] == hp[j] and ea[hid[i]] < ea[hid[j]])


@njit(cache=True)
def _heap_push(hp, hid, ea, n, prio, entry):
    i = n
    hp[i] = prio
    hid[i] = entry
    while i > 0:
        par = (i - 1) // 2
        if not _better(hp, hid, ea, i, par):
            break
        hp[i], hp[par] = hp[par], hp[i]
        hid[i], hid[par] = hid[par], hid[i]
        i = par
    return n + 1


@njit(cache=True)
def _heap_pop(hp, hid, ea, n):
    """Remove the top (moved to index n-1); returns the new size."""
    n -= 1
    hp[0], hp[n] = hp[n], hp[0]
    hid[0], hid[n] = hid[n], hid[0]
    i = 0
    while True:
        lc = 2 * i + 1
        if lc >= n:
            break
        best = lc
        if lc + 1 < n and _better(hp, hid, ea, lc + 1, lc):
            best = lc + 1
        if not _better(hp, hid, ea, best, i):
            break
        hp[i], hp[best] = hp[best], hp[i]
        hid[i], hid[best] = hid[best], hid[i]
        i = best
    return n


@njit(cache=True, fastmath=FAST)
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
    Work buffers are allocated once per chunk of heads (``n_chunk`` chunks), not per head.
    """
    L, H, N, d = kgeom[5], kgeom[6], kgeom[7], kgeom[8]
    out_s = np.empty((L, H, m), np.int32)
    out_e = np.empty((L, H, m), np.int32)
    cap = 3 * N + 1
    n_chunk = max(1, min(L * H, n_chunk))
    for c in prange(n_chunk):
        sums = np.empty((N, d), np.float64)
        n2 = np.empty(N, np.float64)
        row = np.empty(d, np.float32)
        end = np.empty(N, np.int64)
        nxt = np.empty(N, np.int64)
        prv = np.empty(N, np.int64)
        ver = np.empty(N, np.int64)
        alive = np.empty(N, np.bool_)
        hp = np.empty(cap, np.float64)
        hid = np.empty(cap, np.int64)
        ea = np.empty(cap, np.int64)
        eva = np.empty(cap, np.int64)
        eb = np.empty(cap, np.int64)
        evb = np.empty(cap, np.int64)
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
                ver[i] = 0
                alive[i] = True
            n = 0
            ne = 0
            for i in range(N - 1):
                if not p[i] and not p[i + 1]:
                    ea[ne], eva[ne], eb[ne], evb[ne] = i, 0, i + 1, 0
                    n = _heap_push(hp, hid, ea, n, _cos(sums, n2, i, i + 1), ne)
                    ne += 1
            ncl = N
            while ncl > m and n > 0:
                n = _heap_pop(hp, hid, ea, n)
                t = hid[n]
                a, b = ea[t], eb[t]
                if not (alive[a] and alive[b] and ver[a] == eva[t] and ver[b] == evb[t]):
                    continue
                if refuse_below_eps and not (hp[n] > eps):
                    break
                s = 0.0
                for e in range(d):
                    sums[a, e] += sums[b, e]
                    s += sums[a, e] * sums[a, e]
                n2[a] = s
                end[a] = end[b]
                nxt[a] = nxt[b]
                if nxt[b] < N:
                    prv[nxt[b]] = a
                alive[b] = False
                ver[a] += 1
                ncl -= 1
                q = prv[a]
                if q >= 0 and not p[q]:
                    ea[ne], eva[ne], eb[ne], evb[ne] = q, ver[q], a, ver[a]
                    n = _heap_push(hp, hid, ea, n, _cos(sums, n2, q, a), ne)
                    ne += 1
                r = nxt[a]
                if r < N and not p[r]:
                    ea[ne], eva[ne], eb[ne], evb[ne] = a, ver[a], r, ver[r]
                    n = _heap_push(hp, hid, ea, n, _cos(sums, n2, a, r), ne)
                    ne += 1
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
