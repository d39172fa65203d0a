"""Bit-exact ggml KV-cache row codecs (f32, f16, bf16, q8_0, q4_0) and the KV Hadamard rotation, in Numba.

Everything here reproduces, bit for bit, what llama.cpp's **CPU backend** writes into / reads from the KV cache
(llama.cpp vendored by llama-cpp-python 0.3.36, commit 0c1e570). Never imports ``llama_cpp``.

Which C code the cache store uses
---------------------------------
The cache write is ``ggml_set_rows`` (``ggml/src/ggml-cpu/ops.cpp: ggml_compute_forward_set_rows_impl``), which
calls ``ggml_get_type_traits_cpu(dst->type)->from_float`` on every f32 row:

* f16  -> ``ggml_cpu_fp32_to_fp16`` (x86: F16C ``_mm256_cvtps_ph``, round-half-even; NaN keeps its top payload
  bits and is quieted). Ours: :func:`f32_to_f16_bits`.
* bf16 -> ``ggml_cpu_fp32_to_bf16`` = ``ggml_compute_fp32_to_bf16`` (round-half-even, NaN -> ``(u>>16)|64``).
* q4_0 -> ``quantize_row_q4_0`` = ``quantize_row_q4_0_ref`` (scalar, on every architecture).
* q8_0 -> ``quantize_row_q8_0`` in ``ggml-cpu/arch/<arch>/quants.c``, which is **not** the reference on x86
  or ARM. Three roundings exist (``Q8_VARIANT_*``):

  - ``Q8_VARIANT_X86`` (x86 with AVX/AVX2/AVX-512, i.e. every native x86 build): ``id = 127.f/amax``,
    ``_mm256_round_ps`` round-half-even, NaN/overflow -> ``-128`` (cvtps "integer indefinite", saturated).
  - ``Q8_VARIANT_NEON`` (ARM NEON): ``d = amax/127``, ``id = 1.f/d``, ``vcvtnq`` round-half-even.
  - ``Q8_VARIANT_REF`` (``quantize_row_q8_0_ref`` in ggml-quants.c, used by ``ggml_quantize_chunk`` and
    scalar builds): ``d = amax/127``, ``id = 1.f/d``, ``roundf`` (half away from zero).
  - They differ on exact rounding midpoints (x86/NEON: half-even, ref: half away), on the last bit of
    ``id`` (x86 ``127/amax`` vs ``1/(amax/127)``), and on tiny blocks whose inverse scale overflows
    (amax < ~3.7e-37: x86 stores every code as -128, ref as 0; d is 0 in f16 either way).

  ``DEFAULT_Q8_VARIANT`` is chosen from ``platform.machine()`` (x86 -> X86, arm64 -> NEON, else REF).
  NaN inputs to q8_0/q4_0 are not supported (C max/compare semantics with NaN are not emulated).

Dequantization is ``ggml_get_type_traits(type)->to_float`` (ggml-base): ``q * fp16_to_fp32(d)`` in float32.
f16 -> f32 quiets signalling NaNs (ggml computes it with a float multiply); numpy keeps them signalling. That is
the only difference from numpy's ``astype`` in either direction (numpy's f32 -> f16 also keeps sNaN signalling).

Layouts: a cache row is ``[head0 | head1 | ...]`` with ``head_dim`` elements per head; ``head_dim % 32 == 0`` so
heads start on block boundaries. q8_0 block = 34 bytes (f16 d, 32 x int8); q4_0 block = 18 bytes (f16 d, 16
bytes: byte j holds element j in its low nibble and element j+16 in its high nibble, value = (nibble - 8) * d).

Hadamard rotation (``src/llama-kv-cache.cpp``, ``src/llama-impl.h: llama_mul_mat_hadamard``): when the K (V)
cache type is quantized and ``head_dim % 64 == 0`` (and ``LLAMA_ATTN_ROT_DISABLE`` is unset/0), K (V) is
multiplied by the orthonormal Sylvester-Hadamard matrix H (nrot x nrot) on every contiguous chunk of nrot
elements before it is stored: ``k_stored_chunk = H @ k_chunk`` (ggml_mul_mat(rot, x)). K: nrot = largest
power of two >= 64 dividing head_dim; V: nrot = 64. On the CPU backend the mul_mat carries
``GGML_HINT_SRC0_IS_HADAMARD`` and runs ``ggml_compute_forward_fwht`` (ops.cpp): scale by ``1.f/sqrtf(n)``
first, then radix-2 butterflies ``(u+v, u-v)`` for len = 1, 2, 4, ... (the SIMD ``FMA(u, v, -1)`` is exactly
``u - v``). :func:`rotate` reproduces that bit for bit. H is symmetric and H @ H = I, so :func:`unrotate` is
the same transform (llama.cpp's K-shift graph also un-rotates with the same op).

API (all arrays NumPy; ``type_id`` is a ggml type id; ``out=None`` allocates)
------------------------------------------------------------------------------
* ``dequantize_rows(raw: uint8[n, row_bytes], type_id, out: float32[n, n_elems] | None) -> out``
* ``quantize_rows(x: float32[n, n_elems], type_id, out: uint8[n, row_bytes] | None, q8_variant) -> out``
* ``dequantize_rows_at(raw, type_id, rows: int[m], out: float32[m, n_elems] | None) -> out`` (gather)
* ``quantize_rows_at(x: float32[m, n_elems], type_id, rows: int[m], out: uint8[n, row_bytes], q8_variant)``
  (scatter into ``out[rows]``)
* ``dequantize_heads_at(raw, type_id, head_dim, rows: int[m], heads: int[m], out: float32[m, head_dim] | None)``
* ``quantize_heads_at(x: float32[m, head_dim], type_id, head_dim, rows, heads, out: uint8[n, row_bytes],
  q8_variant)``
* ``hadamard_matrix(n) -> float32[n, n]``, ``rot_size(head_dim, kind)``, ``cache_rot_size(type_id, head_dim,
  kind, environ)``, ``rotate(x: float32[..., k*nrot], nrot, out)``, ``unrotate(...)``
* scalar njit helpers ``f16_bits_to_f32``, ``f32_to_f16_bits``, ``bf16_bits_to_f32``, ``f32_to_bf16_bits`` and
  array versions ``f16_bits_to_f32_array``, ``f32_to_f16_bits_array``, ``bf16_bits_to_f32_array``,
  ``f32_to_bf16_bits_array`` (the project's only bf16 conversions; f16 ones with NumPy semantics for the
  kernels are in ``floats``).
* the type table (``types``, importable without Numba): ``TYPES``, ``TYPE_IDS``, ``GGMLType``, ``type_name``,
  ``is_quantized``, ``row_bytes``, ``n_elems_of_row``.

Importing the package loads only the type table; the Numba modules load on first use of their names
(``codec.dequantize_rows`` ...), so the bridge can read the table without paying for Numba.

Quantized V caches are never transposed (llama.cpp needs flash attention for them); a transposed f16 V matrix
``[n_embd_v_gqa, cell_count]`` decodes with the same f16 functions (one "row" per embedding channel).
"""
from __future__ import annotations

import importlib
import logging

from .types import (GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, Q4_0_BLOCK_BYTES,
                    Q8_0_BLOCK_BYTES, QK, QUANTIZED_TYPES, TYPE_IDS, TYPES, GGMLType, ggml_type, is_quantized,
                    n_elems_of_row, row_bytes, type_name)

log = logging.getLogger(__name__)

#: names served lazily (PEP 562) from the Numba modules
_LAZY = {
    **dict.fromkeys(("f16_bits_to_f32", "f32_to_f16_bits", "bf16_bits_to_f32", "f32_to_bf16_bits",
                     "f16_bits_to_f32_array", "f32_to_f16_bits_array", "bf16_bits_to_f32_array",
                     "f32_to_bf16_bits_array"), "._kernels"),
    **dict.fromkeys(("Q8_VARIANT_X86", "Q8_VARIANT_REF", "Q8_VARIANT_NEON", "DEFAULT_Q8_VARIANT",
                     "dequantize_rows", "quantize_rows", "dequantize_rows_at", "quantize_rows_at",
                     "dequantize_heads_at", "quantize_heads_at"), ".rows"),
    **dict.fromkeys(("hadamard_matrix", "rot_size", "cache_rot_size", "rotation_disabled_by_env", "rotate",
                     "unrotate"), ".hadamard"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GGML_TYPE_F32", "GGML_TYPE_F16", "GGML_TYPE_Q4_0", "GGML_TYPE_Q8_0", "GGML_TYPE_BF16", "QUANTIZED_TYPES",
    "QK", "Q8_0_BLOCK_BYTES", "Q4_0_BLOCK_BYTES", "TYPES", "TYPE_IDS", "GGMLType", "ggml_type",
    "type_name", "is_quantized", "row_bytes", "n_elems_of_row", *_LAZY,
]
