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
def _better(hp, ha, i, j):
    return hp[i] > hp[j] or (hp[i] == hp[j] and ha[i] < ha[j])


@njit(cache=True)
def _heap_push(hp, ha, hva, hb, hvb, n, prio, a, va, b, vb):
    i = n
    hp[i], ha[i], hva[i], hb[i], hvb[i] = prio, a, va, b, vb
    while i > 0:
        par = (i - 1) // 2
        if _better(hp, ha, i, par):
            hp[i], hp[par] = hp[par], hp[i]
            ha[i], ha[par] = ha[par], ha[i]
            hva[i], hva[par] = hva[par], hva[i]
            hb[i], hb[par] = hb[par], hb[i]
            hvb[i], hvb[par] = hvb[par], hvb[i]
            i = par
        else:
            break
    return n + 1


@njit(cache=True)
def _heap_pop(hp, ha, hva, hb, hvb, n):
    """Remove the top (moved to index n-1); returns the new size."""
    n -= 1
    hp[0], hp[n] = hp[n], hp[0]
    ha[0], ha[n] = ha[n], ha[0]
    hva[0], hva[n] = hva[n], hva[0]
    hb[0], hb[n] = hb[n], hb[0]
    hvb[0], hvb[n] = hvb[n], hvb[0]
    i = 0
    while True:
        lc = 2 * i + 1
        if lc >= n:
            break
        best = lc
        if lc + 1 < n and _better(hp, ha, lc + 1, lc):
            best = lc + 1
        if _better(hp, ha, best, i):
            hp[i], hp[best] = hp[best], hp[i]
            ha[i], ha[best] = ha[best], ha[i]
            hva[i], hva[best] = hva[best], hva[i]
            hb[i], hb[best] = hb[best], hb[i]
            hvb[i], hvb[best] = hvb[best], hvb[i]
            i = best
        else:
            break
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
def budget_runs_flat(kflat, kgeom, prot, evidence, m, eps, refuse_below_eps):
    """Budget-mode runs by adjacency-constrained agglomerative clustering (see the module docstring).

    keys as (kflat, kgeom) (see :mod:`.strided`); prot bool[L, H, N]; evidence float32[L, H, N].
    """
    L, H, N, d = kgeom[5], kgeom[6], kgeom[7], kgeom[8]
    out_s = np.empty((L, H, m), np.int32)
    out_e = np.empty((L, H, m), np.int32)
    cap = 3 * N + 1
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        p = prot[l, h]
        sums = np.empty((N, d), np.float64)
        n2 = np.zeros(N, np.float64)
        row = np.empty(d, np.float32)
        for i in range(N):
            load_row(kflat, kgeom, l, h, i, row)
            for e in range(d):
                x = np.float64(row[e])
                sums[i, e] = x
                n2[i] += x * x
        end = np.arange(1, N + 1)
        nxt = np.arange(1, N + 1)
        prv = np.arange(-1, N - 1)
        ver = np.zeros(N, np.int64)
        alive = np.ones(N, np.bool_)
        hp = np.empty(cap, np.float64)
        ha = np.empty(cap, np.int64)
        hva = np.empty(cap, np.int64)
        hb = np.empty(cap, np.int64)
        hvb = np.empty(cap, np.int64)
        n = 0
        for i in range(N - 1):
            if not p[i] and not p[i + 1]:
                n = _heap_push(hp, ha, hva, hb, hvb, n, _cos(sums, n2, i, i + 1), i, 0, i + 1, 0)
        ncl = N
        while ncl > m and n > 0:
            n = _heap_pop(hp, ha, hva, hb, hvb, n)
            a, b = ha[n], hb[n]
            if not (alive[a] and alive[b] and ver[a] == hva[n] and ver[b] == hvb[n]):
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
                n = _heap_push(hp, ha, hva, hb, hvb, n, _cos(sums, n2, q, a), q, ver[q], a, ver[a])
            r = nxt[a]
            if r < N and not p[r]:
                n = _heap_push(hp, ha, hva, hb, hvb, n, _cos(sums, n2, a, r), a, ver[a], r, ver[r])
        rs = np.empty(ncl, np.int64)
        re = np.empty(ncl, np.int64)
        c = 0
        i = 0
        while i < N:
            rs[c] = i
            re[c] = end[i]
            c += 1
            i = end[i]
        _evict_runs(rs, re, ncl, p, evidence[l, h], m, out_s[l, h], out_e[l, h])
    return out_s, out_e


def budget_runs(keys, prot, evidence, m, eps, refuse_below_eps):
    """:func:`budget_runs_flat` for keys float16/float32 [L, H, N, d] of any strides."""
    return budget_runs_flat(*flat_view(keys, "keys"), prot, evidence, m, eps, refuse_below_eps)
