"""Top-k selection with protected tokens (the selection methods' and KVMerger's shared core).

Ranking rule everywhere: larger score first, ties broken towards the newer token (larger index); NaN
scores rank as -inf.  Protected tokens: the first ``n_sink`` and the last ``n_recent`` cells.
"""
from __future__ import annotations

import logging

import numpy as np
from numba import njit, prange

log = logging.getLogger(__name__)


@njit(cache=True)
def pick_k(vals, k, largest, newest_ties):
    """bool[c]: the ``k`` largest (or smallest) of ``vals`` (1-D, no NaN) in O(c) via ``np.partition``.

    Among equal values at the cut, later entries win when ``newest_ties`` else earlier ones.
    """
    c = vals.shape[0]
    out = np.zeros(c, np.bool_)
    if k <= 0:
        return out
    if k >= c:
        out[:] = True
        return out
    if largest:
        thr = np.partition(vals, c - k)[c - k]
    else:
        thr = np.partition(vals, k - 1)[k - 1]
    left = k
    for t in range(c):
        if (vals[t] > thr) if largest else (vals[t] < thr):
            out[t] = True
            left -= 1
    for u in range(c):
        if left == 0:
            break
        t = c - 1 - u if newest_ties else u
        if vals[t] == thr:
            out[t] = True
            left -= 1
    return out


@njit(cache=True)
def topk_mark(score, lo, hi, k, mark):
    """Set ``mark[i] = True`` for the ``k`` best unmarked ``i`` in ``[lo, hi)`` by ``score`` (1-D float32)."""
    if k <= 0:
        return
    cand = np.empty(max(hi - lo, 0), np.int64)
    c = 0
    for i in range(lo, hi):
        if not mark[i]:
            cand[c] = i
            c += 1
    vals = np.empty(c, np.float32)
    for t in range(c):
        v = score[cand[t]]
        vals[t] = -np.inf if np.isnan(v) else v
    picked = pick_k(vals, k, True, True)
    for t in range(c):
        if picked[t]:
            mark[cand[t]] = True


@njit(cache=True, parallel=True)
def select_topk(scores, n_sink, n_recent, m):
    """Indices int32[L, Hs, m] (ascending) keeping sinks, the recent window and the top rest by score.

    scores: float32[L, Hs, N]; requires ``n_sink + n_recent <= m <= N``.
    """
    L, H, N = scores.shape
    out = np.empty((L, H, m), np.int32)
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        mark = np.zeros(N, np.bool_)
        for i in range(n_sink):
            mark[i] = True
        for i in range(N - n_recent, N):
            mark[i] = True
        topk_mark(scores[l, h], n_sink, N - n_recent, m - n_sink - n_recent, mark)
        c = 0
        for i in range(N):
            if mark[i]:
                out[l, h, c] = i
                c += 1
    return out


@njit(cache=True, parallel=True)
def protected_mask(evidence, n_sink, n_recent, k_top):
    """bool[L, H, N]: sinks, recent window and the ``k_top`` highest-evidence others (KVMerger step 1)."""
    L, H, N = evidence.shape
    out = np.zeros((L, H, N), np.bool_)
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        mark = out[l, h]
        for i in range(n_sink):
            mark[i] = True
        for i in range(N - n_recent, N):
            mark[i] = True
        topk_mark(evidence[l, h], n_sink, N - n_recent, k_top, mark)
    return out
