"""The public ggml KV-cache row (de)quantization API (semantics: see kvmerge_local.codec; the type table: ``.types``).

All calls validate shapes/dtypes here and run the Numba kernels of ``_kernels``. Output row ``i`` of the gather /
head variants is elements ``[heads[i]*seg, (heads[i]+1)*seg)`` of cache row ``rows[i]``.
"""
from __future__ import annotations

import logging
import platform

import numpy as np

from ._kernels import (_deq_bf16, _deq_f16, _deq_f32, _deq_q4_0, _deq_q8_0, _q_bf16, _q_f16, _q_f32, _q_q4_0,
                       _q_q8_0)
from .types import (GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q8_0, QK, QUANTIZED_TYPES,  # noqa: F401
                    is_quantized, n_elems_of_row, row_bytes, type_name)

log = logging.getLogger(__name__)

Q8_VARIANT_X86 = 0   # ggml-cpu/arch/x86/quants.c quantize_row_q8_0 (AVX/AVX2/AVX-512)
Q8_VARIANT_REF = 1   # ggml-quants.c quantize_row_q8_0_ref (ggml_quantize_chunk, scalar builds)
Q8_VARIANT_NEON = 2  # ggml-cpu/arch/arm/quants.c quantize_row_q8_0 (NEON)

_MACHINE = platform.machine().lower()
if _MACHINE in ("x86_64", "amd64", "i686", "i386"):
    DEFAULT_Q8_VARIANT = Q8_VARIANT_X86
elif _MACHINE in ("aarch64", "arm64"):
    DEFAULT_Q8_VARIANT = Q8_VARIANT_NEON
else:
    DEFAULT_Q8_VARIANT = Q8_VARIANT_REF

# --------------------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------------------

def _check_raw(raw: np.ndarray) -> None:
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        raise TypeError(f"raw must be a uint8[n_rows, row_bytes] array, got {getattr(raw, 'dtype', type(raw))} "
                        f"{getattr(raw, 'shape', '')}")
    if raw.shape[1] > 1 and raw.strides[1] != 1:
        raise ValueError("raw rows must be contiguous (strides[1] == 1)")


def _typed_view(raw: np.ndarray, type_id: int) -> np.ndarray:
    if type_id == GGML_TYPE_F32:
        return raw.view(np.float32)
    if type_id in (GGML_TYPE_F16, GGML_TYPE_BF16):
        return raw.view(np.uint16)
    return raw


def _index(idx, n: int, name: str, m_expected: int | None = None) -> np.ndarray:
    a = np.ascontiguousarray(idx, dtype=np.int64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D")
    if m_expected is not None and a.shape[0] != m_expected:
        raise ValueError(f"{name} has {a.shape[0]} entries, expected {m_expected}")
    if a.size and (a.min() < 0 or a.max() >= n):
        raise IndexError(f"{name} out of range [0, {n})")
    return a


def _seg_args(raw, type_id, n_elems_per_row, rows, heads, seg):
    """Validate and return (type_id, rows, heads) for segment kernels over ``raw``."""
    t = int(type_id)
    type_name(t)
    if row_bytes(t, n_elems_per_row) != raw.shape[1]:
        raise ValueError(f"row of {raw.shape[1]} bytes does not hold {n_elems_per_row} {type_name(t)} elements")
    if t in QUANTIZED_TYPES and seg % QK:
        raise ValueError(f"segment of {seg} elements is not a whole number of {QK}-element blocks")
    n_seg = n_elems_per_row // seg
    rows = _index(rows, raw.shape[0], "rows")
    heads = (np.zeros(rows.shape[0], np.int64) if heads is None
             else _index(heads, n_seg, "heads", rows.shape[0]))
    return t, rows, heads


def _dequantize(raw, t, rows, heads, seg, out):
    src = _typed_view(raw, t)
    if t == GGML_TYPE_F32:
        _deq_f32(src, rows, heads, seg, out)
    elif t == GGML_TYPE_F16:
        _deq_f16(src, rows, heads, seg, out)
    elif t == GGML_TYPE_BF16:
        _deq_bf16(src, rows, heads, seg, out)
    elif t == GGML_TYPE_Q8_0:
        _deq_q8_0(raw, raw.view(np.int8), rows, heads, seg, QK, out)
    else:
        _deq_q4_0(raw, rows, heads, seg, QK, out)
    return out


def _quantize(x, t, rows, heads, seg, out, q8_variant):
    dst = _typed_view(out, t)
    if t == GGML_TYPE_F32:
        _q_f32(x, rows, heads, seg, dst)
    elif t == GGML_TYPE_F16:
        _q_f16(x, rows, heads, seg, dst)
    elif t == GGML_TYPE_BF16:
        _q_bf16(x, rows, heads, seg, dst)
    elif t == GGML_TYPE_Q8_0:
        if q8_variant not in (Q8_VARIANT_X86, Q8_VARIANT_REF, Q8_VARIANT_NEON):
            raise ValueError(f"unknown q8_variant {q8_variant}")
        _q_q8_0(x, rows, heads, seg, QK, int(q8_variant), dst)
    else:
        _q_q4_0(x, rows, heads, seg, QK, dst)
    return out


def _out_f32(out, shape):
    if out is None:
        return np.empty(shape, np.float32)
    if out.dtype != np.float32 or out.shape != shape:
        raise ValueError(f"out must be float32{list(shape)}, got {out.dtype}{list(out.shape)}")
    return out


def _in_f32(x, n_cols: int, n_rows: int | None, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != n_cols:
        raise ValueError(f"{name} must be float32[m, {n_cols}], got {getattr(x, 'dtype', type(x))}"
                         f"{list(getattr(x, 'shape', []))}")
    if n_rows is not None and x.shape[0] != n_rows:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {n_rows}")
    return x


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------

def dequantize_rows(raw: np.ndarray, type_id: int, out: np.ndarray | None = None) -> np.ndarray:
    """Decode whole cache rows.

    raw: uint8[n_rows, row_bytes] (rows contiguous; read-only/unaligned views of a state blob are fine);
    type_id: ggml type id; out: float32[n_rows, n_elems] or None (allocated). Returns out.
    """
    _check_raw(raw)
    t = int(type_id)
    n_elems = n_elems_of_row(t, raw.shape[1])
    rows = np.arange(raw.shape[0], dtype=np.int64)
    out = _out_f32(out, (raw.shape[0], n_elems))
    return _dequantize(raw, t, rows, np.zeros_like(rows), n_elems, out)


def quantize_rows(x: np.ndarray, type_id: int, out: np.ndarray | None = None,
                  q8_variant: int = DEFAULT_Q8_VARIANT) -> np.ndarray:
    """Encode whole rows exactly as ggml's CPU ``from_float`` (the KV-cache store) does.

    x: float32[n_rows, n_elems]; type_id: ggml type id; out: uint8[n_rows, row_bytes] or None (allocated);
    q8_variant: which q8_0 rounding (``Q8_VARIANT_*``, default: this machine's CPU backend). Returns out.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError("x must be float32[n_rows, n_elems]")
    n_rows, n_elems = _in_f32(x, x.shape[1], None).shape
    t = int(type_id)
    nbytes = row_bytes(t, n_elems)
    if out is None:
        out = np.empty((n_rows, nbytes), np.uint8)
    _check_raw(out)
    if out.shape != (n_rows, nbytes):
        raise ValueError(f"out must be uint8[{n_rows}, {nbytes}], got {list(out.shape)}")
    rows = np.arange(n_rows, dtype=np.int64)
    return _quantize(x, t, rows, np.zeros_like(rows), n_elems, out, q8_variant)


def dequantize_rows_at(raw: np.ndarray, type_id: int, rows, out: np.ndarray | None = None) -> np.ndarray:
    """Gather-decode: ``out[i] = decode(raw[rows[i]])``; only those rows are touched.

    raw: uint8[n_rows, row_bytes]; rows: int[m] (any order, repeats allowed); out: float32[m, n_elems] or None.
    """
    _check_raw(raw)
    t = int(type_id)
    n_elems = n_elems_of_row(t, raw.shape[1])
    t, rows, heads = _seg_args(raw, t, n_elems, rows, None, n_elems)
    out = _out_f32(out, (rows.shape[0], n_elems))
    return _dequantize(raw, t, rows, heads, n_elems, out)


def quantize_rows_at(x: np.ndarray, type_id: int, rows, out: np.ndarray,
                     q8_variant: int = DEFAULT_Q8_VARIANT) -> np.ndarray:
    """Scatter-encode: ``out[rows[i]] = encode(x[i])``; other rows of out are left as they are.

    x: float32[m, n_elems]; rows: int[m], unique (with repeats, which write wins is unspecified);
    out: uint8[n_rows, row_bytes] (e.g. a writable view into a state blob). Returns out.
    """
    _check_raw(out)
    t = int(type_id)
    n_elems = n_elems_of_row(t, out.shape[1])
    t, rows, heads = _seg_args(out, t, n_elems, rows, None, n_elems)
    _in_f32(x, n_elems, rows.shape[0])
    return _quantize(x, t, rows, heads, n_elems, out, q8_variant)


def dequantize_heads_at(raw: np.ndarray, type_id: int, head_dim: int, rows, heads,
                        out: np.ndarray | None = None) -> np.ndarray:
    """Gather-decode per-head sub-rows: ``out[i] = decode(raw[rows[i]])[heads[i]*head_dim:(heads[i]+1)*head_dim]``.

    raw: uint8[n_rows, row_bytes] with rows ``[head0|head1|...]``; head_dim: elements per head (a multiple of 32
    for q4_0/q8_0); rows, heads: int[m]; out: float32[m, head_dim] or None. Only the selected blocks are read.
    For per-head cell lists ``idx[n_head, m]``: ``rows=idx.ravel(), heads=np.repeat(np.arange(n_head), m)``,
    then ``out.reshape(n_head, m, head_dim)``.
    """
    _check_raw(raw)
    t = int(type_id)
    n_elems = n_elems_of_row(t, raw.shape[1])
    if head_dim <= 0 or n_elems % head_dim:
        raise ValueError(f"row of {n_elems} elements is not a whole number of heads of {head_dim}")
    t, rows, heads = _seg_args(raw, t, n_elems, rows, heads, head_dim)
    out = _out_f32(out, (rows.shape[0], head_dim))
    return _dequantize(raw, t, rows, heads, head_dim, out)


def quantize_heads_at(x: np.ndarray, type_id: int, head_dim: int, rows, heads, out: np.ndarray,
                      q8_variant: int = DEFAULT_Q8_VARIANT) -> np.ndarray:
    """Scatter-encode per-head sub-rows: ``out[rows[i]]`` head ``heads[i]`` = encode(x[i]).

    x: float32[m, head_dim]; rows, heads: int[m] ((row, head) pairs unique); out: uint8[n_rows, row_bytes].
    Blocks never straddle heads (head_dim % 32 == 0), so the result is bit-identical to encoding whole rows.
    """
    _check_raw(out)
    t = int(type_id)
    n_elems = n_elems_of_row(t, out.shape[1])
    if head_dim <= 0 or n_elems % head_dim:
        raise ValueError(f"row of {n_elems} elements is not a whole number of heads of {head_dim}")
    t, rows, heads = _seg_args(out, t, n_elems, rows, heads, head_dim)
    _in_f32(x, head_dim, rows.shape[0])
    return _quantize(x, t, rows, heads, head_dim, out, q8_variant)
