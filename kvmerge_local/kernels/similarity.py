"""Row-level numeric kernels: adjacent-key cosine (KVMerger step 2) and 1-D pooling (SnapKV).

Keys are float32 or f16 bits (``uint16``) ``[n_layer, n_kv_head, N, head_dim]``, any strides; only one
row at a time is converted, accumulation is float64.
"""
from __future__ import annotations

import logging

import numpy as np
from numba import njit, prange

from .f16 import load

log = logging.getLogger(__name__)


@njit(cache=True, parallel=True)
def adjacent_cosine(keys):
    """``s[l, h, i] = cos(k_i, k_{i+1})`` as float32[L, H, N-1]; 0 where either key is the zero vector."""
    L, H, N, d = keys.shape
    out = np.zeros((L, H, max(N - 1, 0)), np.float32)
    for lh in prange(L * H):
        l = lh // H
        h = lh - l * H
        prev = np.empty(d, np.float64)
        cur = np.empty(d, np.float64)
        if N == 0:
            continue
        pn = 0.0
        for e in range(d):
            x = np.float64(load(keys[l, h, 0, e]))
            prev[e] = x
            pn += x * x
        for i in range(1, N):
            cn = 0.0
            dot = 0.0
            for e in range(d):
                x = np.float64(load(keys[l, h, i, e]))
                cur[e] = x
                cn += x * x
                dot += x * prev[e]
            if pn > 0.0 and cn > 0.0:
                out[l, h, i - 1] = dot / np.sqrt(pn * cn)
            prev, cur = cur, prev
            pn = cn
    return out


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
