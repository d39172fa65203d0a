"""f16-aware element access inside Numba kernels: loads, stores and whole-row stores on ``uint16`` f16 bits or
``float32``.

Numba has no CPU ``float16`` arrays, so f16 caches are passed as ``uint16`` views and only the rows a
kernel touches are converted.  The conversions themselves are :mod:`kvmerge_local.codec.floats` (the one
implementation, bit-identical to NumPy's ``astype``; re-exported here for the kernels and their tests).

- ``load(x)`` -- one element (``uint16`` f16 bits or ``float32``) as ``float32``.
- ``load_math(x)`` -- the same for values that only feed arithmetic (vectorizes; see its doc).
- ``store(v, arr)`` -- ``float32`` value ``v`` converted to ``arr``'s element type (f16 bits or f32),
  saturated to the finite f16 range for f16 (merged states never become inf).
- ``store_row(acc, flat, o, step)`` -- a whole float32 row stored the same way.
"""
from __future__ import annotations

import logging

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..codec.floats import (HAS_F16C, _f16_fpext, _f32_fptrunc, f16_bits_to_f32, f16_bits_to_f32_hw,  # noqa: F401
                            f16_bits_to_f32_soft, f32_to_f16_bits, f32_to_f16_bits_hw, f32_to_f16_bits_soft,
                            llvm_host_features)

log = logging.getLogger(__name__)

F16_MAX_BITS = 0x7BFF


def load(x):
    """Element (f16 bits or f32) -> float32.  Numba-only (see the overload); in Python: same result."""
    return np.uint16(x).view(np.float16).astype(np.float32) if isinstance(x, np.uint16) else np.float32(x)


@overload(load)
def _load_ov(x):
    if x == types.uint16:
        return lambda x: f16_bits_to_f32(x)
    if isinstance(x, types.Float):
        return lambda x: np.float32(x)
    return None


def load_math(x):
    """Element -> float32 for arithmetic only (merges): like :func:`load`, except that an f16 NaN may come
    back quieted.  The hardware path converts a whole row with ``vcvtph2ps`` (no per-element NaN test,
    so the loop vectorizes); every result that goes through a float multiply is bit-identical to
    :func:`load`'s, because the multiply quiets a signalling NaN the same way.  Numba-only (overload)."""
    return load(x)


@overload(load_math)
def _load_math_ov(x):
    if x == types.uint16:
        if HAS_F16C:
            return lambda x: _f16_fpext(x)
        return lambda x: f16_bits_to_f32(x)
    if isinstance(x, types.Float):
        return lambda x: np.float32(x)
    return None


def store(v, arr):
    """float32 -> ``arr``'s element type.  Numba-only (see the overload)."""
    return v


@overload(store)
def _store_ov(v, arr):
    if arr.dtype == types.uint16:

        def impl(v, arr):
            # saturate first (merged states stay finite; NaN passes): the same bits as rounding then
            # replacing +-inf by +-65504, since everything in (65504, 65520) rounds to 65504 anyway
            x = np.float32(v)
            x = np.float32(65504.0) if x > np.float32(65504.0) else x
            x = np.float32(-65504.0) if x < np.float32(-65504.0) else x
            return f32_to_f16_bits(x)

        return impl
    if arr.dtype == types.float32:
        return lambda v, arr: np.float32(v)
    return None


def store_row(acc, flat, o, step):
    """``flat[o + e*step] = store(acc[e], flat)`` for a whole row.  Numba-only (see the overload)."""
    for e in range(acc.shape[0]):
        flat[o + e * step] = acc[e]


@overload(store_row)
def _store_row_ov(acc, flat, o, step):
    if flat.dtype == types.uint16:

        def impl(acc, flat, o, step):
            # fast path: clamp + hardware rounding (vectorizes); NaN rows redone with NumPy's NaN rule
            d = acc.shape[0]
            nan = False
            hi = np.float32(65504.0)
            if step == 1:
                row = flat[o:o + d]
                for e in range(d):
                    x = acc[e]
                    nan |= x != x
                    x = hi if x > hi else x
                    x = -hi if x < -hi else x
                    row[e] = _f32_fptrunc(x) if HAS_F16C else f32_to_f16_bits(x)
            else:
                for e in range(d):
                    x = acc[e]
                    nan |= x != x
                    x = hi if x > hi else x
                    x = -hi if x < -hi else x
                    flat[o + e * step] = _f32_fptrunc(x) if HAS_F16C else f32_to_f16_bits(x)
            if nan:
                for e in range(d):
                    flat[o + e * step] = store(acc[e], flat)

        return impl
    if flat.dtype == types.float32:

        def impl(acc, flat, o, step):
            for e in range(acc.shape[0]):
                flat[o + e * step] = acc[e]

        return impl
    return None


@njit(cache=True, parallel=True)
def f16_to_f32_array(bits):
    """uint16[n] half bits -> float32[n] (test/diagnostic helper; kernels convert row by row)."""
    out = np.empty(bits.shape[0], np.float32)
    for i in prange(bits.shape[0]):
        out[i] = f16_bits_to_f32(bits[i])
    return out


@njit(cache=True, parallel=True)
def f32_to_f16_array(x):
    """float32[n] -> uint16[n] half bits, no saturation (test/diagnostic helper)."""
    out = np.empty(x.shape[0], np.uint16)
    for i in prange(x.shape[0]):
        out[i] = f32_to_f16_bits(x[i])
    return out


def as_kernel_array(a: np.ndarray, name: str = "array") -> np.ndarray:
    """View a float16 array as uint16 (same strides, no copy); float32 passes through.

    Raises ValueError for other dtypes.
    """
    if a.dtype == np.float16:
        return a.view(np.uint16)
    if a.dtype == np.float32 or a.dtype == np.uint16:
        return a
    raise ValueError(f"{name} must be float16 or float32, got {a.dtype}")
