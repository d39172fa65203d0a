"""Bit conversions and row / head-segment (de)quantization kernels for ggml KV-cache rows.

Semantics and sources: see kvmerge_local.codec. All njit code that calls each other lives in this one module on
purpose: numba's on-disk cache only notices edits to a function's own file, so a helper in another module
could leave stale cached callers behind.  The exception is the f16 <-> f32 pair, which comes from ``.floats``
(the single implementation; F16C instructions when the CPU has them): after editing those, clear the
__pycache__ Numba caches.  bfloat16 <-> f32 is here, once (scalars for the kernels, arrays for everyone else).

All kernels work on (row index, segment index) pairs: output row ``i`` is elements
``[heads[i]*seg, (heads[i]+1)*seg)`` of cache row ``rows[i]``. Whole rows are ``seg = n_elems, heads = 0``.
"""
from __future__ import annotations

import logging

import numba as nb
import numpy as np

from .floats import f16_bits_to_f32_ggml as f16_bits_to_f32  # noqa: F401 - the one f16 implementation
from .floats import f32_to_f16_bits_ggml as f32_to_f16_bits  # noqa: F401

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# scalar bit conversions
# --------------------------------------------------------------------------------------------------------------

@nb.njit(cache=True, inline="always")
def _bits_f32(u):
    return np.uint32(u).view(np.float32)


@nb.njit(cache=True, inline="always")
def _f32_bits(f):
    return np.float32(f).view(np.uint32)


@nb.njit(cache=True, inline="always")
def bf16_bits_to_f32(h):
    """uint16 bf16 bit pattern -> float32 (a shift, as ggml_compute_bf16_to_fp32)."""
    return _bits_f32(np.uint32(h) << np.uint32(16))


@nb.njit(cache=True, inline="always")
def f32_to_bf16_bits(f):
    """float32 -> uint16 bf16 bit pattern exactly as ggml_compute_fp32_to_bf16 (RNE, NaN -> (u>>16)|64)."""
    u = _f32_bits(f)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@nb.njit(cache=True, parallel=True)
def _bits_to_f32_array(h, bf16, out):
    """uint16[n] f16 (``bf16=False``) or bf16 bit patterns -> float32[n] ``out`` (the flag is loop invariant)."""
    for i in nb.prange(h.size):
        out[i] = bf16_bits_to_f32(h[i]) if bf16 else f16_bits_to_f32(h[i])


@nb.njit(cache=True, parallel=True)
def _f32_to_bits_array(x, bf16, out):
    """float32[n] -> uint16[n] ``out`` f16 (``bf16=False``) or bf16 bit patterns."""
    for i in nb.prange(x.size):
        out[i] = f32_to_bf16_bits(x[i]) if bf16 else f32_to_f16_bits(x[i])


def _convert(a: np.ndarray, in_dtype, out_dtype, bf16: bool) -> np.ndarray:
    """Convert ``a`` (any shape/strides) into a new ``out_dtype`` array of the same shape."""
    a = np.ascontiguousarray(a, dtype=in_dtype)
    out = np.empty(a.shape, out_dtype)
    (_bits_to_f32_array if out_dtype == np.float32 else _f32_to_bits_array)(a.reshape(-1), bf16, out.reshape(-1))
    return out


def f16_bits_to_f32_array(h: np.ndarray) -> np.ndarray:
    """uint16[...] f16 bit patterns -> float32[...] (same shape), ggml semantics."""
    return _convert(h, np.uint16, np.float32, False)


def f32_to_f16_bits_array(x: np.ndarray) -> np.ndarray:
    """float32[...] -> uint16[...] f16 bit patterns (same shape), F16C/ggml CPU semantics."""
    return _convert(x, np.float32, np.uint16, False)


def bf16_bits_to_f32_array(h: np.ndarray) -> np.ndarray:
    """uint16[...] bf16 bit patterns (any strides) -> float32[...] (same shape, a new array), as ggml."""
    return _convert(h, np.uint16, np.float32, True)


def f32_to_bf16_bits_array(x: np.ndarray) -> np.ndarray:
    """float32[...] -> uint16[...] bf16 bit patterns (same shape), round-half-even as ggml_compute_fp32_to_bf16."""
    return _convert(x, np.float32, np.uint16, True)


# --------------------------------------------------------------------------------------------------------------
# integer conversion emulation
# --------------------------------------------------------------------------------------------------------------

_TWO31 = np.float32(2147483648.0)
_INF = np.float32(np.inf)
_RNE_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


@nb.njit(cache=True, inline="always")
def _q8_code(v, variant):
    """int code (-128..127, as stored byte value 0..255) of the already-scaled float32 ``v``."""
    if variant == 0:  # x86: _mm256_round_ps(RNE) -> cvtps_epi32 (NaN/overflow: INT_MIN) -> packs (saturate)
        r = np.rint(v)
        if not (abs(r) < _TWO31):
            q = -128
        else:
            q = int(r)
            if q > 127:
                q = 127
            elif q < -128:
                q = -128
    elif variant == 2:  # NEON: vcvtnq_s32_f32 (RNE, saturating, NaN->0), low byte stored
        r = np.rint(v)
        if r != r:
            q = 0
        elif r >= _TWO31:
            q = 2147483647
        elif r < -_TWO31:
            q = -2147483648
        else:
            q = int(r)
    else:  # ref: roundf (half away from zero) -> (int8_t) via cvttss2si (NaN/overflow: INT_MIN), low byte
        t = np.trunc(v)
        if abs(v - t) >= np.float32(0.5):
            t = t + (np.float32(1.0) if v > 0 else np.float32(-1.0))
        if not (abs(t) < _TWO31):
            q = -2147483648
        else:
            q = int(t)
    return q & 0xFF


@nb.njit(cache=True, inline="always")
def _q4_code(t):
    """(uint8) MIN(15, (int8_t) t) as in quantize_row_q4_0_ref; ``t`` = x*id + 8.5f (float32)."""
    if not (abs(t) < _TWO31):
        q = 0  # INT_MIN truncated to int8
    else:
        q = int(np.trunc(t)) & 0xFF
        if q >= 128:
            q -= 256
    if q > 15:
        q = 15
    return q & 0xFF


# --------------------------------------------------------------------------------------------------------------
# dequantize kernels: src rows -> out float32[m, seg]
# Indexing goes through slices so that numba drops negative-index wraparound, and the 32-element block loops
# run to a runtime ``qk`` (== 32): with a literal trip count LLVM fully unrolls them into scalar code instead of
# vectorizing (2x slower).
# --------------------------------------------------------------------------------------------------------------

@nb.njit(cache=True, parallel=True)
def _deq_f32(src, rows, heads, seg, out):
    for i in nb.prange(rows.shape[0]):
        e0 = heads[i] * seg
        s = src[rows[i], e0:e0 + seg]
        o = out[i]
        for j in range(seg):
            o[j] = s[j]


@nb.njit(cache=True, parallel=True)
def _deq_f16(src, rows, heads, seg, out):
    for i in nb.prange(rows.shape[0]):
        e0 = heads[i] * seg
        s = src[rows[i], e0:e0 + seg]
        o = out[i]
        for j in range(seg):
            o[j] = f16_bits_to_f32(s[j])


@nb.njit(cache=True, parallel=True)
def _deq_bf16(src, rows, heads, seg, out):
    for i in nb.prange(rows.shape[0]):
        e0 = heads[i] * seg
        s = src[rows[i], e0:e0 + seg]
        o = out[i]
        for j in range(seg):
            o[j] = bf16_bits_to_f32(s[j])


@nb.njit(cache=True, inline="always")
def _scale(blk):
    return f16_bits_to_f32(np.uint16(np.int64(blk[0]) | (np.int64(blk[1]) << 8)))


@nb.njit(cache=True, parallel=True)
def _deq_q8_0(raw, rawi8, rows, heads, seg, qk, out):
    nblk = seg // 32
    for i in nb.prange(rows.shape[0]):
        r = rows[i]
        b0 = heads[i] * nblk
        s = raw[r, b0 * 34:(b0 + nblk) * 34]
        si = rawi8[r, b0 * 34:(b0 + nblk) * 34]
        o = out[i]
        for b in range(nblk):
            d = _scale(s[b * 34:b * 34 + 2])
            qs = si[b * 34 + 2:b * 34 + 34]
            ob = o[b * 32:b * 32 + 32]
            for j in range(qk):
                ob[j] = np.float32(qs[j]) * d


@nb.njit(cache=True, parallel=True)
def _deq_q4_0(raw, rows, heads, seg, qk, out):
    nblk = seg // 32
    for i in nb.prange(rows.shape[0]):
        b0 = heads[i] * nblk
        s = raw[rows[i], b0 * 18:(b0 + nblk) * 18]
        o = out[i]
        for b in range(nblk):
            d = _scale(s[b * 18:b * 18 + 2])
            qs = s[b * 18 + 2:b * 18 + 18]
            lo = o[b * 32:b * 32 + 16]
            hi = o[b * 32 + 16:b * 32 + 32]
            for j in range(qk // 2):
                byte = np.int32(qs[j])
                lo[j] = np.float32((byte & 15) - 8) * d
                hi[j] = np.float32((byte >> 4) - 8) * d


# --------------------------------------------------------------------------------------------------------------
# quantize kernels: x float32[m, seg] -> dst rows
# --------------------------------------------------------------------------------------------------------------

@nb.njit(cache=True, parallel=True)
def _q_f32(x, rows, heads, seg, dst):
    for i in nb.prange(rows.shape[0]):
        e0 = heads[i] * seg
        dr = dst[rows[i], e0:e0 + seg]
        xr = x[i]
        for j in range(seg):
            dr[j] = xr[j]


@nb.njit(cache=True, parallel=True)
def _q_f16(x, rows, heads, seg, dst):
    for i in nb.prange(rows.shape[0]):
        e0 = heads[i] * seg
        dr = dst[rows[i], e0:e0 + seg]
        xr = x[i]
        for j in range(seg):
            dr[j] = f32_to_f16_bits(xr[j])


@nb.njit(cache=True, parallel=True)
def _q_bf16(x, rows, heads, seg, dst):
    for i in nb.prange(rows.shape[0]):
        e0 = heads[i] * seg
        dr = dst[rows[i], e0:e0 + seg]
        xr = x[i]
        for j in range(seg):
            dr[j] = f32_to_bf16_bits(xr[j])


@nb.njit(cache=True, inline="always")
def _put_scale(blk, d):
    hb = np.int64(f32_to_f16_bits(d))
    blk[0] = np.uint8(hb & 0xFF)
    blk[1] = np.uint8(hb >> 8)


@nb.njit(cache=True, parallel=True)
def _q_q8_0(x, rows, heads, seg, qk, variant, dst):
    nblk = seg // 32
    zero = np.float32(0.0)
    for i in nb.prange(rows.shape[0]):
        b0 = heads[i] * nblk
        dr = dst[rows[i], b0 * 34:(b0 + nblk) * 34]
        xr = x[i]
        for b in range(nblk):
            xb = xr[b * 32:b * 32 + 32]
            blk = dr[b * 34:b * 34 + 34]
            qs = blk[2:34]
            amax = zero
            for j in range(qk):
                a = abs(xb[j])
                if a > amax:
                    amax = a
            d = amax / np.float32(127.0)
            if variant == 0:
                idv = np.float32(127.0) / amax if amax != zero else zero
            else:
                idv = np.float32(1.0) / d if d != zero else zero
            _put_scale(blk, d)
            if amax < _INF and idv < _INF:  # fast path: |x*id| <= ~127, no NaN/overflow to emulate
                if variant == 1:
                    for j in range(qk):
                        v = xb[j] * idv
                        t = np.trunc(v)
                        fr = v - t
                        t = t + np.float32(1.0) if fr >= np.float32(0.5) else (
                            t - np.float32(1.0) if fr <= np.float32(-0.5) else t)
                        qs[j] = np.uint8(np.int32(t) & 0xFF)
                else:  # round-half-even of |v| < 2^22 by the 1.5*2^23 trick (exact; np.rint is a libm call)
                    for j in range(qk):
                        qs[j] = np.uint8(np.int32((xb[j] * idv + _RNE_MAGIC) - _RNE_MAGIC) & 0xFF)
            else:
                for j in range(qk):
                    qs[j] = np.uint8(_q8_code(xb[j] * idv, variant))


@nb.njit(cache=True, parallel=True)
def _q_q4_0(x, rows, heads, seg, qk, dst):
    nblk = seg // 32
    zero = np.float32(0.0)
    for i in nb.prange(rows.shape[0]):
        b0 = heads[i] * nblk
        dr = dst[rows[i], b0 * 18:(b0 + nblk) * 18]
        xr = x[i]
        for b in range(nblk):
            xlo = xr[b * 32:b * 32 + 16]
            xhi = xr[b * 32 + 16:b * 32 + 32]
            blk = dr[b * 18:b * 18 + 18]
            qs = blk[2:18]
            amax = zero
            mx = zero
            for j in range(qk):
                v = xr[b * 32 + j]
                if amax < abs(v):
                    amax = abs(v)
                    mx = v
            d = mx / np.float32(-8.0)
            idv = np.float32(1.0) / d if d != zero else zero
            _put_scale(blk, d)
            if abs(mx) < _INF and idv != zero and abs(idv) < _INF:  # fast path: x*id+8.5 in [0.5, 16.5]
                for j in range(qk // 2):
                    lo = min(np.int32(xlo[j] * idv + np.float32(8.5)), 15)
                    hi = min(np.int32(xhi[j] * idv + np.float32(8.5)), 15)
                    qs[j] = np.uint8((lo | (hi << 4)) & 0xFF)
            else:
                for j in range(qk // 2):
                    lo = _q4_code(xlo[j] * idv + np.float32(8.5))
                    hi = _q4_code(xhi[j] * idv + np.float32(8.5))
                    qs[j] = np.uint8((lo | (hi << 4)) & 0xFF)
