"""IEEE half <-> single conversions on raw ``uint16`` bit patterns, as Numba scalar functions (the project's one
implementation; NumPy has no f16 arithmetic inside Numba and Numba no CPU ``float16`` arrays).

Two families:

- ``f16_bits_to_f32`` / ``f32_to_f16_bits`` (and their ``_soft`` / ``_hw`` versions): bit-identical to NumPy's
  ``astype`` for every finite value, signed zeros, subnormals and infinities (round-half-to-even, overflow to
  inf); NaNs stay NaN with NumPy's payload rule.  The kernels (:mod:`kvmerge_local.kernels.f16`) use these.
- ``*_ggml``: ggml's CPU semantics (x86 F16C): identical except that NaNs come back quieted like the hardware
  does.  The row codecs of this package use these.

``HAS_F16C`` picks the hardware instructions (``vcvtph2ps`` / ``vcvtps2ph`` through LLVM ``fpext`` /
``fptrunc`` on ``half``) when the CPU has them, else the integer algorithms.  bfloat16 lives in ``_kernels``
(``bf16_bits_to_f32`` / ``f32_to_bf16_bits``): a shift and a rounding, no hardware path needed.
"""
from __future__ import annotations

import logging

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

try:
    from llvmlite.binding import get_host_cpu_features as _features
except ImportError:  # pragma: no cover
    _features = None

log = logging.getLogger(__name__)

def llvm_host_features() -> str:
    """LLVM's feature string of this CPU ("+f16c,+avx2,..."); empty when unknown."""
    try:
        return str(_features().flatten()) if _features else ""
    except Exception:  # pragma: no cover - exotic platforms
        return ""


@intrinsic
def _u32_as_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as float32 (LLVM trunc + bitcast)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _f32_as_u32(typingctx, x):
    """Reinterpret the bits of a float32 as uint32 (LLVM bitcast)."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _f16_fpext(typingctx, x):
    """uint16 half bits -> float32 through LLVM ``fpext half`` (one vcvtph2ps with F16C)."""
    if x != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(cache=True)
def f16_bits_to_f32_soft(h):
    """uint16 half bits -> float32 value, pure integer code (exact)."""
    hh = np.uint32(h)
    sign = (hh & np.uint32(0x8000)) << np.uint32(16)
    exp = (hh >> np.uint32(10)) & np.uint32(0x1F)
    mant = hh & np.uint32(0x3FF)
    if exp == 0:
        if mant == 0:
            return _u32_as_f32(sign)
        e = np.uint32(113)  # 127 - 15 + 1
        while (mant & np.uint32(0x400)) == 0:
            mant <<= np.uint32(1)
            e -= np.uint32(1)
        mant &= np.uint32(0x3FF)
        return _u32_as_f32(sign | (e << np.uint32(23)) | (mant << np.uint32(13)))
    if exp == 31:
        return _u32_as_f32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13)))
    return _u32_as_f32(sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13)))


@njit(cache=True)
def f16_bits_to_f32_hw(h):
    """uint16 half bits -> float32: hardware conversion (exact, vectorizable), NaN/inf by bits so NaN
    payloads are kept exactly as NumPy does (the hardware would quiet signalling NaNs)."""
    hh = np.uint32(h)
    if (hh & np.uint32(0x7C00)) == np.uint32(0x7C00):
        return _u32_as_f32(((hh & np.uint32(0x8000)) << np.uint32(16)) | np.uint32(0x7F800000)
                           | ((hh & np.uint32(0x3FF)) << np.uint32(13)))
    return _f16_fpext(np.uint16(h))


@intrinsic
def _f32_fptrunc(typingctx, x):
    """float32 -> uint16 half bits through LLVM ``fptrunc`` (vcvtps2ph, round-half-to-even)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


HAS_F16C = "+f16c" in llvm_host_features()
f16_bits_to_f32 = f16_bits_to_f32_hw if HAS_F16C else f16_bits_to_f32_soft


@njit(cache=True)
def f32_to_f16_bits_soft(v):
    """float32 value -> uint16 half bits, round-half-to-even (NumPy's npy_floatbits_to_halfbits)."""
    f = _f32_as_u32(np.float32(v))
    h_sgn = (f & np.uint32(0x80000000)) >> np.uint32(16)
    f_exp = f & np.uint32(0x7F800000)
    if f_exp >= np.uint32(0x47800000):
        if f_exp == np.uint32(0x7F800000):
            f_sig = f & np.uint32(0x007FFFFF)
            if f_sig != 0:
                ret = np.uint32(0x7C00) + (f_sig >> np.uint32(13))
                if ret == np.uint32(0x7C00):
                    ret += np.uint32(1)
                return np.uint16(h_sgn + ret)
        return np.uint16(h_sgn + np.uint32(0x7C00))
    if f_exp <= np.uint32(0x38000000):
        if f_exp < np.uint32(0x33000000):
            return np.uint16(h_sgn)
        e = f_exp >> np.uint32(23)
        f_sig = np.uint32(0x00800000) + (f & np.uint32(0x007FFFFF))
        f_sig >>= np.uint32(113) - e
        if ((f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000)) or ((f & np.uint32(0x7FF)) != 0):
            f_sig += np.uint32(0x1000)
        return np.uint16(h_sgn + (f_sig >> np.uint32(13)))
    h_exp = (f_exp - np.uint32(0x38000000)) >> np.uint32(13)
    f_sig = f & np.uint32(0x007FFFFF)
    if (f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000):
        f_sig += np.uint32(0x1000)
    return np.uint16(h_sgn + h_exp + (f_sig >> np.uint32(13)))


@njit(cache=True)
def f32_to_f16_bits_hw(v):
    """float32 -> half bits: hardware rounding (identical to NumPy for non-NaN), NaN by NumPy's rule
    (payload truncated, kept a NaN); branch-free so loops vectorize."""
    x = np.float32(v)
    f = _f32_as_u32(x)
    hw = np.uint32(_f32_fptrunc(x))
    sig = (f & np.uint32(0x007FFFFF)) >> np.uint32(13)
    nan = ((f >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7C00) | sig
    nan += np.uint32(1) if sig == 0 else np.uint32(0)
    return np.uint16(nan if (f & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else hw)


f32_to_f16_bits = f32_to_f16_bits_hw if HAS_F16C else f32_to_f16_bits_soft


# -- ggml semantics (used by this package's row codecs: bit-exact to ggml's CPU conversions) -------------------
# Identical to the functions above except for NaNs, where they follow x86 F16C (what ggml uses on CPU): a
# signalling NaN comes back quieted (payload kept) and f32 -> f16 keeps the top payload bits and sets the
# quiet bit.  With F16C they are the bare hardware instructions; without, ggml's portable algorithms.


@njit(cache=True, inline="always")
def f16_bits_to_f32_ggml_soft(h):
    """uint16 f16 bits -> float32, ggml_compute_fp16_to_fp32's algorithm (branch-free, vectorizes).

    Exact for every non-NaN; NaN payloads are kept and signalling NaNs come back quieted (the float multiply)."""
    w = np.uint32(h) << np.uint32(16)
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32(w << np.uint32(1))
    normalized = _u32_as_f32(np.uint32((two_w >> np.uint32(4)) + np.uint32(0x70000000))) * \
        np.float32(1.925929944387236e-34)  # 0x1.0p-112f
    denormalized = _u32_as_f32(np.uint32((two_w >> np.uint32(17)) | np.uint32(0x3F000000))) - np.float32(0.5)
    bits = _f32_as_u32(denormalized) if two_w < np.uint32(0x08000000) else _f32_as_u32(normalized)
    return _u32_as_f32(np.uint32(sign | bits))


@njit(cache=True, inline="always")
def f32_to_f16_bits_ggml_soft(f):
    """float32 -> uint16 f16 bits, round-half-even, as x86 F16C ``cvtps_ph`` (ggml's CPU from_float).

    ggml_compute_fp32_to_fp16's algorithm (the float adder rounds), branch-free, except NaN, which keeps its
    top 9 payload bits and gets the quiet bit like F16C instead of becoming 0x7E00."""
    f = np.float32(f)
    w = _f32_as_u32(f)
    shl1_w = np.uint32(w << np.uint32(1))
    sign = w & np.uint32(0x80000000)
    base = (np.float32(abs(f)) * np.float32(5.192296858534828e+33)) * np.float32(7.703719777548943e-34)
    bias = shl1_w & np.uint32(0xFF000000)
    bias = bias if bias > np.uint32(0x71000000) else np.uint32(0x71000000)
    base = _u32_as_f32(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))) + base
    bits = _f32_as_u32(base)
    nonsign = ((bits >> np.uint32(13)) & np.uint32(0x7C00)) + (bits & np.uint32(0x0FFF))
    nan = np.uint32(0x7E00) | ((w >> np.uint32(13)) & np.uint32(0x3FF))
    return np.uint16((sign >> np.uint32(16)) | (nan if shl1_w > np.uint32(0xFF000000) else nonsign))


@njit(cache=True, inline="always")
def f16_bits_to_f32_ggml_hw(h):
    """uint16 f16 bits -> float32 by ``vcvtph2ps`` (same bits as the soft version, NaNs included)."""
    return _f16_fpext(np.uint16(h))


@njit(cache=True, inline="always")
def f32_to_f16_bits_ggml_hw(f):
    """float32 -> uint16 f16 bits by ``vcvtps2ph`` (same bits as the soft version, NaNs included)."""
    return _f32_fptrunc(np.float32(f))


f16_bits_to_f32_ggml = f16_bits_to_f32_ggml_hw if HAS_F16C else f16_bits_to_f32_ggml_soft
f32_to_f16_bits_ggml = f32_to_f16_bits_ggml_hw if HAS_F16C else f32_to_f16_bits_ggml_soft
