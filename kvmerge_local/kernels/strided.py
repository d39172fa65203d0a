"""Strided cache views as (flat buffer, geometry) so kernels get unit-stride inner loops.

Numba compiles a 4-D array of arbitrary strides with generic indexing that LLVM cannot vectorize.  We
hand kernels instead a 1-D contiguous view ``flat`` over the array's memory (starting at its lowest
address) and ``geom = int64[off0, S0, S1, S2, S3, L, H, N, d]`` (element strides, possibly negative or
zero); element ``[l, h, i, e]`` is ``flat[off0 + l*S0 + h*S1 + i*S2 + e*S3]``.  Row loads then take a
unit-stride fast path when ``S3 == 1`` (K rows, V rows without transposition).
"""
from __future__ import annotations

import logging

import numpy as np
from numba import njit

from .f16 import as_kernel_array, load_math

log = logging.getLogger(__name__)


def flat_view(a: np.ndarray, name: str = "array") -> tuple[np.ndarray, np.ndarray]:
    """``(flat, geom)`` for a 4-D float16/float32 array (float16 seen as uint16 bits); no copy.

    Raises ValueError when a stride is not a multiple of the item size.
    """
    a = as_kernel_array(a, name)
    if a.ndim != 4:
        raise ValueError(f"{name} must be 4-D, got shape {a.shape}")
    item = a.itemsize
    if any(s % item for s in a.strides):
        raise ValueError(f"{name} strides {a.strides} are not multiples of the item size {item}")
    S = [s // item for s in a.strides]
    if a.size == 0:
        return np.zeros(1, a.dtype), np.array([0, *S, *a.shape], np.int64)
    off0 = sum((n - 1) * -s for n, s in zip(a.shape, S) if s < 0)
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(a.shape, S))
    corner = a[tuple(slice(n - 1, n) if s < 0 else slice(0, 1) for n, s in zip(a.shape, S))]
    flat = np.lib.stride_tricks.as_strided(corner, shape=(span,), strides=(item,), writeable=a.flags.writeable)
    return flat, np.array([off0, *S, *a.shape], np.int64)


@njit(cache=True)
def row_offset(geom, l, h, i):
    """Flat index of element ``[l, h, i, 0]``."""
    return geom[0] + l * geom[1] + h * geom[2] + i * geom[3]


@njit(cache=True)
def load_row(flat, geom, l, h, i, out):
    """``out[:d] = float32(x[l, h, i, :])`` for rows that feed arithmetic (cosines, distances, sums): f16
    bits converted in the loop by :func:`~.f16.load_math`, which vectorizes (a signalling NaN may come
    back quieted, which no arithmetic result can tell apart)."""
    o = row_offset(geom, l, h, i)
    s = geom[4]
    d = geom[8]
    if s == 1:
        row = flat[o:o + d]
        for e in range(d):
            out[e] = load_math(row[e])
    else:
        for e in range(d):
            out[e] = load_math(flat[o + e * s])

