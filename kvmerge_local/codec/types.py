"""The ggml tensor types a KV cache can hold: the project's one type table (NumPy only, no Numba).

``TYPES[type_id]`` is a :class:`GGMLType`: ggml's name, elements and bytes per block (1 and the element size
for the float types) and the NumPy dtype a float cache is viewed in (bf16 as its ``uint16`` bits; ``None`` for
the block-quantized types, viewed as ``uint8`` blocks).  Ids are ``enum ggml_type`` (ggml/include/ggml.h).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q8_0 = 8
GGML_TYPE_BF16 = 30

QK = 32  # elements per q4_0 / q8_0 block
Q8_0_BLOCK_BYTES = 34
Q4_0_BLOCK_BYTES = 18


@dataclass(frozen=True)
class GGMLType:
    """One ggml type: ``name``, ``block`` elements per ``block_bytes`` bytes, ``view`` dtype (None: quantized)."""

    name: str
    block: int
    block_bytes: int
    view: type | None


TYPES: dict[int, GGMLType] = {
    GGML_TYPE_F32: GGMLType("f32", 1, 4, np.float32),
    GGML_TYPE_F16: GGMLType("f16", 1, 2, np.float16),
    GGML_TYPE_Q4_0: GGMLType("q4_0", QK, Q4_0_BLOCK_BYTES, None),
    GGML_TYPE_Q8_0: GGMLType("q8_0", QK, Q8_0_BLOCK_BYTES, None),
    GGML_TYPE_BF16: GGMLType("bf16", 1, 2, np.uint16),
}
#: name -> ggml type id ("f16" -> 1, ...)
TYPE_IDS: dict[str, int] = {t.name: k for k, t in TYPES.items()}
QUANTIZED_TYPES = tuple(k for k, t in TYPES.items() if t.view is None)


def ggml_type(type_id: int) -> GGMLType:
    """The table entry of a supported type id; ValueError if unsupported."""
    try:
        return TYPES[int(type_id)]
    except KeyError:
        raise ValueError(f"unsupported ggml type id {type_id}") from None


def type_name(type_id: int) -> str:
    """ggml's name of a supported type id ('f16', 'q8_0', ...); ValueError if unsupported."""
    return ggml_type(type_id).name


def is_quantized(type_id: int) -> bool:
    """True for the block-quantized types (q4_0, q8_0), like ggml_is_quantized."""
    return int(type_id) in QUANTIZED_TYPES


def row_bytes(type_id: int, n_elems: int) -> int:
    """Bytes of one row of ``n_elems`` elements of ggml type ``type_id`` (like ggml_row_size); ValueError for an
    unsupported type or a row that is not a whole number of blocks."""
    t = ggml_type(type_id)
    if n_elems % t.block:
        raise ValueError(f"{t.name} rows need a multiple of {t.block} elements, got {n_elems}")
    return n_elems // t.block * t.block_bytes


def n_elems_of_row(type_id: int, n_row_bytes: int) -> int:
    """Elements in a row of ``n_row_bytes`` bytes of ggml type ``type_id`` (inverse of :func:`row_bytes`)."""
    t = ggml_type(type_id)
    if n_row_bytes % t.block_bytes:
        raise ValueError(f"{n_row_bytes} bytes is not a whole number of {t.name} blocks")
    return n_row_bytes // t.block_bytes * t.block
