"""The RoPE re-rotation kernel: rotate cached keys in place by a per-(layer, head, cell) angle-table row.

Used by :func:`kvmerge_local.bridge.rope.rerotate_state_keys` (which builds the angle table as ggml does);
no llama.cpp here, NumPy in and out.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .f16 import load, store


@nb.njit(cache=True, parallel=True)
def _shift_kernel(k, idx, cos_t, sin_t, neox):  # pragma: no cover - compiled
    """In place: rotate ``k[l, h, c, :n_rot]`` (uint16 f16 bits or float32, any strides) by the angles of
    table row ``idx[l, h, c]`` (``cos_t``/``sin_t``: float32[n_delta, n_rot // 2]; -1 = leave alone)."""
    L, H, N = idx.shape
    half = cos_t.shape[1]
    for lh in nb.prange(L * H):
        l, h = lh // H, lh % H
        for c in range(N):
            r = idx[l, h, c]
            if r < 0:
                continue
            for i in range(half):
                cs, sn = cos_t[r, i], sin_t[r, i]
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                x0, x1 = load(k[l, h, c, a]), load(k[l, h, c, b])
                k[l, h, c, a] = store(x0 * cs - x1 * sn, k)
                k[l, h, c, b] = store(x0 * sn + x1 * cs, k)


def rotate_keys(k: np.ndarray, idx: np.ndarray, cos_t: np.ndarray, sin_t: np.ndarray, neox: bool) -> None:
    """Rotate ``k`` in place: float16 or float32 ``[L, H, N, head_dim]`` (any strides; f16 through its uint16
    bits), cell ``(l, h, c)`` by row ``idx[l, h, c]`` (int64[L, H, N], -1: untouched) of the float32 tables
    ``cos_t``/``sin_t`` ``[n_rows, n_rot // 2]``; pairs ``(i, i + n_rot/2)`` with ``neox``, else ``(2i, 2i+1)``."""
    kk = k.view(np.uint16) if k.dtype == np.float16 else k
    _shift_kernel(kk, idx, np.ascontiguousarray(cos_t, np.float32), np.ascontiguousarray(sin_t, np.float32),
                  bool(neox))
