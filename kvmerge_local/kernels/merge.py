"""Plan builders: runs -> Gaussian-kernel merged slots (KVMerger steps 4-7) and CaM's value merges.

All builders fill CSR arrays (see :mod:`kvmerge_local.plan`) whose ``offsets`` were computed from
per-slot source counts by :func:`csr_offsets`.
"""
from __future__ import annotations

import logging

import numpy as np
from numba import njit, prange

from .strided import load_row
from .similarity import FAST

log = logging.getLogger(__name__)


def csr_offsets(counts: np.ndarray) -> np.ndarray:
    """int64[L, H, m+1] offsets from per-slot source counts ``counts`` int[L, H, m] (flat (l, h, j) order)."""
    L, H, m = counts.shape
    cs = np.zeros(L * H * m + 1, np.int64)
    np.cumsum(counts.reshape(-1), out=cs[1:])
    idx = np.arange(L * H)[:, None] * m + np.arange(m + 1)[None, :]
    return cs[idx].reshape(L, H, m + 1)


@njit(cache=True, parallel=True, fastmath=FAST)
def gaussian_runs_fill(kflat, kgeom, evidence, positions, start, end, sigma, use_rms, size_scale, offsets, src, wk, wv, pos):
    """Fill the CSR plan for runs ``start/end`` int32[L, H, m] (KVMerger, docs/ALGORITHMS.md steps 4-7).

    Pivot ``p`` = the member with the largest ``evidence`` (ties: the newest).  Weights
    ``g_i = exp(-||k_p - k_i||^2 / (2 sigma^2))``, ``w_i = g_i / sum_S g`` (distances summed in float32,
    vectorized; weights in float64, stored float32);
    ``use_rms``: ``sigma^2 = mean_S ||k_p - k_i||^2`` (all ``g = 1`` when that is 0).  ``wk = w``;
    ``wv = w * |S|`` when ``size_scale`` else ``w``.  The slot carries the pivot's position.
    keys as (kflat, kgeom) (see :mod:`.strided`); evidence float32[L, H, N]; positions int32[L, H, N].
    """
    L, H, m = start.shape
    d = kgeom[8]
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        kp = np.empty(d, np.float32)
        row = np.empty(d, np.float32)
        dist = np.empty(kgeom[7], np.float64)
        for j in range(m):
            a = start[l, h, j]
            b = end[l, h, j]
            o = offsets[l, h, j]
            if b - a == 1:
                src[o] = a
                wk[o] = 1.0
                wv[o] = 1.0
                pos[l, h, j] = positions[l, h, a]
                continue
            piv = a
            for i in range(a + 1, b):
                if evidence[l, h, i] >= evidence[l, h, piv]:
                    piv = i
            load_row(kflat, kgeom, l, h, piv, kp)
            tot = 0.0
            for i in range(a, b):
                load_row(kflat, kgeom, l, h, i, row)
                s = np.float32(0.0)
                for e in range(d):
                    x = kp[e] - row[e]
                    s += x * x
                dist[i - a] = s
                tot += s
            n = b - a
            s2 = tot / n if use_rms else sigma * sigma
            gsum = 0.0
            for t in range(n):
                g = np.exp(-dist[t] / (2.0 * s2)) if s2 > 0.0 else 1.0
                dist[t] = g
                gsum += g
            scale = float(n) if size_scale else 1.0
            for t in range(n):
                w = dist[t] / gsum
                src[o + t] = a + t
                wk[o + t] = w
                wv[o + t] = w * scale
            pos[l, h, j] = positions[l, h, piv]


@njit(cache=True, parallel=True)
def cam_merge_mask(keep, evidence, u, merge_budget):
    """CaM Eq. 14: which evicted cells merge, and the extra value sources per kept slot.

    keep int32[L, H, m] ascending kept cells; evidence float32[L, H, N] (accumulated attention);
    u float32[L, H, N] uniform draws.  Evicted cell i targets the next ``merge_budget`` kept cells
    ``T_i``; ``p_i = clamp(A_i / mean(A_T), 0, 1)`` (0/0 -> 0, x/0 -> 1); merges when ``u_i < p_i``.
    Returns (merged bool[L, H, N], extra int64[L, H, m]).
    """
    L, H, m = keep.shape
    N = evidence.shape[2]
    merged = np.zeros((L, H, N), np.bool_)
    extra = np.zeros((L, H, m), np.int64)
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        diff = np.zeros(m + 1, np.int64)
        jk = 0
        mean_of = -1  # mean(A_T) depends on T_i only: computed once per run of evicted cells
        mean = 0.0
        for i in range(N):
            if jk < m and keep[l, h, jk] == i:
                jk += 1
                continue
            stop = min(jk + merge_budget, m)
            if stop <= jk:
                continue
            if mean_of != jk:
                mean = 0.0
                for t in range(jk, stop):
                    mean += evidence[l, h, keep[l, h, t]]
                mean /= stop - jk
                mean_of = jk
            ai = np.float64(evidence[l, h, i])
            if mean > 0.0:
                pr = min(max(ai / mean, 0.0), 1.0)
            else:
                pr = 1.0 if ai > 0.0 else 0.0
            if u[l, h, i] < pr:
                merged[l, h, i] = True
                diff[jk] += 1
                diff[stop] -= 1
        c = 0
        for j in range(m):
            c += diff[j]
            extra[l, h, j] = c
    return merged, extra


@njit(cache=True, parallel=True)
def cam_fill(keep, merged, positions, merge_budget, offsets, src, wk, wv, pos):
    """CaM Eq. 15 as a plan: slot j = kept cell (wk = wv = 1) then each merged evicted i with wk = 0,
    wv = 1/|T_i| (ascending i).  Keys are thereby copies; values ``V_t + sum_i M_i V_i / |T_i|``."""
    L, H, m = keep.shape
    N = merged.shape[2]
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        cur = np.empty(m, np.int64)
        for j in range(m):
            o = offsets[l, h, j]
            src[o] = keep[l, h, j]
            wk[o] = 1.0
            wv[o] = 1.0
            cur[j] = o + 1
            pos[l, h, j] = positions[l, h, keep[l, h, j]]
        jk = 0
        for i in range(N):
            if jk < m and keep[l, h, jk] == i:
                jk += 1
                continue
            if not merged[l, h, i]:
                continue
            stop = min(jk + merge_budget, m)
            w = np.float32(1.0 / (stop - jk))
            for t in range(jk, stop):
                src[cur[t]] = i
                wk[cur[t]] = 0.0
                wv[cur[t]] = w
                cur[t] += 1
