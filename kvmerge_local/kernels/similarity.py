"""Row-level numeric kernels: adjacent-key cosine (KVMerger step 2) and 1-D pooling (SnapKV).

Keys are float32 or f16 bits (``uint16``) ``[n_layer, n_kv_head, N, head_dim]``, any strides; only one
row at a time is converted, accumulation is float64.
"""
from __future__ import annotations

import logging

import numpy as np
from numba import njit, prange

from .strided import flat_view, load_row

log = logging.getLogger(__name__)


FAST = {"reassoc", "contract"}  # reductions may be vectorized (reordered sums); no nnan/ninf assumptions


@njit(cache=True, parallel=True, fastmath=FAST)
def adjacent_cosine_flat(flat, geom):
    """``s[l, h, i] = cos(k_i, k_{i+1})`` as float32[L, H, N-1] for keys given as (flat, geom)."""
    L, H, N, d = geom[5], geom[6], geom[7], geom[8]
    out = np.zeros((L, H, max(N - 1, 0)), np.float32)
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        prev = np.empty(d, np.float32)
        cur = np.empty(d, np.float32)
        if N == 0:
            continue
        load_row(flat, geom, l, h, 0, prev)
        pn = np.float32(0.0)
        for e in range(d):
            pn += prev[e] * prev[e]
        for i in range(1, N):
            load_row(flat, geom, l, h, i, cur)
            cn = np.float32(0.0)
            dot = np.float32(0.0)
            for e in range(d):
                x = cur[e]
                cn += x * x
                dot += x * prev[e]
            if pn > 0.0 and cn > 0.0:
                out[l, h, i - 1] = np.float64(dot) / np.sqrt(np.float64(pn) * np.float64(cn))
            prev, cur = cur, prev
            pn = cn
    return out


def adjacent_cosine(keys):
    """``s[l, h, i] = cos(k_i, k_{i+1})`` as float32[L, H, N-1]; 0 where either key is the zero vector.

    keys: float16/float32 (or f16 bits) [L, H, N, d], any strides.  Sums in float32, vectorized (the
    reference sums in float64: parity is to ~1e-6, far below any threshold's meaning).
    """
    return adjacent_cosine_flat(*flat_view(keys, "keys"))


@njit(cache=True, parallel=True)
def pool1d(x, stop, kernel_size, use_max):
    """SnapKV smoothing of ``x`` float32[L, H, N] over ``[0, stop)``, stride 1, padding ``kernel_size//2``.

    Average pooling counts the zero padding (PyTorch ``avg_pool1d`` default, as in SnapKV's code); max
    pooling ignores it.  Entries at ``>= stop`` are copied unchanged.  Returns float32[L, H, N].
    """
    L, H, N = x.shape
    out = np.empty((L, H, N), np.float32)
    half = kernel_size // 2
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        for i in range(N):
            if i >= stop:
                out[l, h, i] = x[l, h, i]
                continue
            lo = max(i - half, 0)
            hi = min(i - half + kernel_size, stop)
            if use_max:
                v = -np.inf
                for t in range(lo, hi):
                    if x[l, h, t] > v:
                        v = x[l, h, t]
                out[l, h, i] = v
            else:
                acc = np.float32(0.0)
                for t in range(lo, hi):
                    acc += x[l, h, t]
                out[l, h, i] = acc / np.float32(kernel_size)
    return out
