"""Scalar and array bit conversions f32 <-> f16 / bf16 with ggml CPU semantics (see kvmerge_local.codec)."""
from __future__ import annotations

import logging

import numba as nb
import numpy as np

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
def f16_bits_to_f32(h):
    """uint16 f16 bit pattern -> float32, ggml_compute_fp16_to_fp32's algorithm (branch-free, vectorizes).

    Exact for every non-NaN; NaN payloads are kept and signalling NaNs come back quieted (the float multiply)."""
    w = np.uint32(h) << np.uint32(16)
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32(w << np.uint32(1))
    normalized = _bits_f32(np.uint32((two_w >> np.uint32(4)) + np.uint32(0x70000000))) * \
        np.float32(1.925929944387236e-34)  # 0x1.0p-112f
    denormalized = _bits_f32(np.uint32((two_w >> np.uint32(17)) | np.uint32(0x3F000000))) - np.float32(0.5)
    bits = _f32_bits(denormalized) if two_w < np.uint32(0x08000000) else _f32_bits(normalized)
    return _bits_f32(np.uint32(sign | bits))


@nb.njit(cache=True, inline="always")
def f32_to_f16_bits(f):
    """float32 -> uint16 f16 bit pattern, round-half-even, as x86 F16C ``cvtps_ph`` (ggml's CPU from_float).

    ggml_compute_fp32_to_fp16's algorithm (the float adder rounds), branch-free, except NaN, which keeps its
    top 9 payload bits and gets the quiet bit like F16C instead of becoming 0x7E00."""
    w = _f32_bits(f)
    shl1_w = np.uint32(w << np.uint32(1))
    sign = w & np.uint32(0x80000000)
    base = (np.float32(abs(f)) * np.float32(5.192296858534828e+33)) * np.float32(7.703719777548943e-34)
    bias = shl1_w & np.uint32(0xFF000000)
    bias = bias if bias > np.uint32(0x71000000) else np.uint32(0x71000000)
    base = _bits_f32(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))) + base
    bits = _f32_bits(base)
    nonsign = ((bits >> np.uint32(13)) & np.uint32(0x7C00)) + (bits & np.uint32(0x0FFF))
    nan = np.uint32(0x7E00) | ((w >> np.uint32(13)) & np.uint32(0x3FF))
    return np.uint16((sign >> np.uint32(16)) | (nan if shl1_w > np.uint32(0xFF000000) else nonsign))


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
def _f16_to_f32_array(h, out):
    for i in nb.prange(h.size):
        out[i] = f16_bits_to_f32(h[i])


@nb.njit(cache=True, parallel=True)
def _f32_to_f16_array(x, out):
    for i in nb.prange(x.size):
        out[i] = f32_to_f16_bits(x[i])


def f16_bits_to_f32_array(h: np.ndarray) -> np.ndarray:
    """uint16[...] f16 bit patterns -> float32[...] (same shape), ggml semantics."""
    h = np.ascontiguousarray(h, dtype=np.uint16)
    out = np.empty(h.shape, np.float32)
    _f16_to_f32_array(h.reshape(-1), out.reshape(-1))
    return out


def f32_to_f16_bits_array(x: np.ndarray) -> np.ndarray:
    """float32[...] -> uint16[...] f16 bit patterns (same shape), F16C/ggml CPU semantics."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint16)
    _f32_to_f16_array(x.reshape(-1), out.reshape(-1))
    return out
