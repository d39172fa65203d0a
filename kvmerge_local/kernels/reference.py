"""Slow, obviously-correct NumPy references for every kernel (used by the parity tests).

Same shapes, dtypes and tie rules as the Numba kernels; loops over (layer, head) and cells in Python.
"""
from __future__ import annotations

import logging

import numpy as np

from ..plan import Plan

log = logging.getLogger(__name__)


def _f32(a: np.ndarray) -> np.ndarray:
    """f16 bit views (uint16) or float arrays -> float32 values."""
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a.astype(np.float32)


def adjacent_cosine(keys: np.ndarray) -> np.ndarray:
    """float32[L, H, N-1]: cos(k_i, k_{i+1}) in float64, 0 for zero vectors."""
    k = _f32(keys).astype(np.float64)
    a, b = k[:, :, :-1], k[:, :, 1:]
    na, nb = (a * a).sum(-1), (b * b).sum(-1)
    dot = (a * b).sum(-1)
    ok = (na > 0) & (nb > 0)
    return np.where(ok, dot / np.sqrt(np.where(ok, na * nb, 1.0)), 0.0).astype(np.float32)


def pool1d(x: np.ndarray, stop: int, kernel_size: int, use_max: bool) -> np.ndarray:
    """SnapKV pooling over [0, stop) (avg counts zero padding; max ignores it); the rest copied."""
    out = x.astype(np.float32).copy()
    half = kernel_size // 2
    for i in range(stop):
        lo, hi = max(i - half, 0), min(i - half + kernel_size, stop)
        seg = x[..., lo:hi]
        if use_max:
            out[..., i] = seg.max(-1)
        else:
            acc = np.zeros(x.shape[:-1], np.float32)
            for t in range(hi - lo):
                acc += seg[..., t]
            out[..., i] = acc / np.float32(kernel_size)
    return out


def _rank(score: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Candidates ordered best first: score descending (NaN = -inf), ties -> larger index first."""
    s = np.nan_to_num(score[cand].astype(np.float32), nan=-np.inf)
    return cand[np.lexsort((-cand, -s))]


def select_topk(scores: np.ndarray, n_sink: int, n_recent: int, m: int) -> np.ndarray:
    """int32[L, Hs, m]: sinks + recent + top (m - sinks - recent) others by score, ascending."""
    L, H, N = scores.shape
    out = np.empty((L, H, m), np.int32)
    for l in range(L):
        for h in range(H):
            keep = set(range(n_sink)) | set(range(N - n_recent, N))
            keep |= set(_rank(scores[l, h], np.arange(n_sink, N - n_recent))[: m - n_sink - n_recent].tolist())
            out[l, h] = sorted(keep)
    return out


def protected_mask(evidence: np.ndarray, n_sink: int, n_recent: int, k_top: int) -> np.ndarray:
    """bool[L, H, N]: sinks, recent and the k_top highest-evidence others."""
    L, H, N = evidence.shape
    out = np.zeros((L, H, N), bool)
    out[:, :, :n_sink] = True
    out[:, :, N - n_recent:] = True
    for l in range(L):
        for h in range(H):
            out[l, h, _rank(evidence[l, h], np.arange(n_sink, N - n_recent))[:k_top]] = True
    return out


def _evict(runs: list[tuple[int, int]], prot: np.ndarray, ev: np.ndarray, m: int) -> list[tuple[int, int]]:
    """Drop the lowest-evidence unprotected runs (ties: older first) until m remain."""
    cand = [r for r in range(len(runs)) if not (runs[r][1] - runs[r][0] == 1 and prot[runs[r][0]])]
    sums = np.array([ev[runs[r][0]:runs[r][1]].astype(np.float64).sum() for r in cand])
    order = sorted(range(len(cand)), key=lambda t: (sums[t], cand[t]))
    drop = {cand[t] for t in order[: max(0, len(runs) - m)]}
    return [runs[r] for r in range(len(runs)) if r not in drop]


def _to_arrays(all_runs, L, H, m):
    start = np.array([[[a for a, _ in all_runs[l][h]] for h in range(H)] for l in range(L)], np.int32).reshape(L, H, m)
    end = np.array([[[b for _, b in all_runs[l][h]] for h in range(H)] for l in range(L)], np.int32).reshape(L, H, m)
    return start, end


def threshold_runs(cos, prot, evidence, m, eps):
    """Threshold-mode runs: cut where cos <= eps or next to a protected cell; split/evict to m."""
    L, H, N = prot.shape
    res = []
    for l in range(L):
        res.append([])
        for h in range(H):
            c = cos[l, h].astype(np.float32)
            cut = [bool(prot[l, h, i] or prot[l, h, i + 1] or not c[i] > eps) for i in range(N - 1)]
            uncut = [i for i in range(N - 1) if not cut[i]]
            for i in sorted(uncut, key=lambda i: (c[i], i))[: max(0, m - 1 - sum(cut))]:
                cut[i] = True
            bounds = [0] + [i + 1 for i in range(N - 1) if cut[i]] + [N]
            runs = list(zip(bounds[:-1], bounds[1:]))
            res[l].append(_evict(runs, prot[l, h], evidence[l, h], m))
    return _to_arrays(res, L, H, m)


def budget_runs(keys, prot, evidence, m, eps, refuse_below_eps):
    """Budget-mode runs by brute force: repeatedly merge the best adjacent allowed pair (O(N^2))."""
    L, H, N, _ = keys.shape
    k = _f32(keys).astype(np.float64)
    res = []
    for l in range(L):
        res.append([])
        for h in range(H):
            runs = [[i, i + 1] for i in range(N)]
            sums = [k[l, h, i].copy() for i in range(N)]
            while len(runs) > m:
                best, bi = None, -1
                for r in range(len(runs) - 1):
                    a, b = runs[r][0], runs[r + 1][0]
                    if prot[l, h, a] or prot[l, h, b]:
                        continue
                    na, nb = sums[r] @ sums[r], sums[r + 1] @ sums[r + 1]
                    cs = (sums[r] @ sums[r + 1]) / np.sqrt(na * nb) if na > 0 and nb > 0 else 0.0
                    if best is None or cs > best:
                        best, bi = cs, r
                if best is None or (refuse_below_eps and not best > eps):
                    break
                sums[bi] = sums[bi] + sums[bi + 1]
                runs[bi][1] = runs[bi + 1][1]
                del runs[bi + 1], sums[bi + 1]
            res[l].append(_evict([tuple(r) for r in runs], prot[l, h], evidence[l, h], m))
    return _to_arrays(res, L, H, m)


def gaussian_plan(keys, evidence, positions, start, end, sigma, use_rms, size_scale) -> Plan:
    """KVMerger slots from runs: pivot = argmax evidence (newest on ties), Gaussian weights."""
    L, H, m = start.shape
    k = _f32(keys).astype(np.float64)
    offsets = np.zeros((L, H, m + 1), np.int64)
    src, wk, wv, pos = [], [], [], np.zeros((L, H, m), np.int32)
    n = 0
    for l in range(L):
        for h in range(H):
            for j in range(m):
                offsets[l, h, j] = n
                a, b = int(start[l, h, j]), int(end[l, h, j])
                ev = evidence[l, h, a:b]
                piv = a + int(np.flatnonzero(ev == ev.max())[-1])
                dist = ((k[l, h, piv] - k[l, h, a:b]) ** 2).sum(-1)
                s2 = dist.mean() if use_rms else sigma * sigma
                g = np.exp(-dist / (2 * s2)) if s2 > 0 else np.ones(b - a)
                w = g / g.sum()
                src += list(range(a, b))
                wk += list(w)
                wv += list(w * (b - a) if size_scale else w)
                pos[l, h, j] = positions[l, h, piv]
                n += b - a
            offsets[l, h, m] = n
    return Plan(keys.shape[2], offsets, np.array(src, np.int32), np.array(wk, np.float32),
                np.array(wv, np.float32), pos)


def cam_plan(keep, evidence, u, merge_budget, positions) -> Plan:
    """CaM plan from kept cells (Eq. 14-15): slot = kept cell + merged evicted cells (wk 0, wv 1/|T|)."""
    L, H, m = keep.shape
    N = evidence.shape[2]
    offsets = np.zeros((L, H, m + 1), np.int64)
    src, wk, wv = [], [], []
    n = 0
    for l in range(L):
        for h in range(H):
            kept = list(keep[l, h])
            slots = [[(c, 1.0, 1.0)] for c in kept]
            for i in range(N):
                if i in kept:
                    continue
                j0 = int(np.searchsorted(keep[l, h], i))
                tgt = list(range(j0, min(j0 + merge_budget, m)))
                if not tgt:
                    continue
                mean = np.mean([np.float64(evidence[l, h, kept[t]]) for t in tgt])
                ai = np.float64(evidence[l, h, i])
                p = min(max(ai / mean, 0.0), 1.0) if mean > 0 else (1.0 if ai > 0 else 0.0)
                if u[l, h, i] < p:
                    for t in tgt:
                        slots[t].append((i, 0.0, float(np.float32(1.0 / len(tgt)))))
            for j in range(m):
                offsets[l, h, j] = n
                for c, a, b in slots[j]:
                    src.append(c)
                    wk.append(a)
                    wv.append(b)
                n += len(slots[j])
            offsets[l, h, m] = n
    pos = np.take_along_axis(np.broadcast_to(positions, (L, H, N)), keep.astype(np.intp), 2).astype(np.int32)
    return Plan(N, offsets, np.array(src, np.int32), np.array(wk, np.float32), np.array(wv, np.float32), pos)


def apply_plan(src: np.ndarray, plan: Plan, which: str = "k") -> np.ndarray:
    """dst [L, H, m, d] of src's dtype: copies move raw elements, merges sum w*x in float32 in order."""
    w = plan.wk if which == "k" else plan.wv
    L, H, _, d = src.shape
    dst = np.empty((L, H, plan.m, d), src.dtype)
    for l in range(L):
        for h in range(H):
            for j in range(plan.m):
                a, b = plan.offsets[l, h, j], plan.offsets[l, h, j + 1]
                nz = [t for t in range(a, b) if w[t] != 0]
                if len(nz) == 1 and w[nz[0]] == 1:
                    dst[l, h, j] = src[l, h, plan.src[nz[0]]]
                    continue
                acc = np.zeros(d, np.float32)
                for n, t in enumerate(nz):  # the first term initializes (keeps -0.0 as the kernel does)
                    term = w[t] * src[l, h, plan.src[t]].astype(np.float32)
                    acc = term if n == 0 else acc + term
                if src.dtype == np.float16:
                    acc = np.clip(acc, -65504, 65504)
                dst[l, h, j] = acc.astype(src.dtype)
    return dst
