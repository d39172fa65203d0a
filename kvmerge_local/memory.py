"""Cache storage (the K and V element types) and memory budgets: the bytes a document's cache may take.

    KVStorage.parse("q8_0/q4_0")           # K in q8_0, V in q4_0 ("q8_0" alone: both)
    KVStorage.parse("q8_0/q4_0").ratio     # 0.406: bytes per cell / an f16 cache's bytes per cell
    plan = MemoryPlan.for_fraction(0.25)   # a quarter of the f16 full cache's bytes
    plan.storage, plan.budget              # -> KVStorage('q4_0', 'q4_0'), Budget(0.8889)

A memory budget is the fraction of the bytes the f16 cache of every document token would take.  It is met by
quantizing the cache first (llama.cpp's own q8_0/q4_0 blocks: 32 elements in 34 or 18 bytes) and evicting only
what quantizing cannot save: :meth:`MemoryPlan.for_fraction` takes the most precise storage of ``LADDER`` whose
full cache fits, else the smallest storage with the cell budget that fits.  Why this order: on
SmolLM2-135M-Instruct the quantized caches keep the full cache's answers while eviction at the same memory loses
many (README, "Results on the real model"; docs/MEMORY.md).  Keys stay in q8_0 in the ladder: they carry outlier
channels that per-token 4-bit blocks quantize worst (KIVI, docs/MEMORY.md); ``--kv-type q4_0`` is there for who
wants it.  Importing this module loads NumPy and the codec's type table, not Numba or llama.cpp.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from .budget import Budget
from .codec.types import TYPE_IDS, TYPES
from .defaults import KV_TYPE_NAMES

def _bits(name: str) -> float:
    """Bits per element of a cache type, from ggml's block sizes (q8_0: 34 bytes per 32 elements)."""
    t = TYPES[TYPE_IDS[name]]
    return 8.0 * t.block_bytes / t.block


@dataclass(frozen=True)
class KVStorage:
    """The element types of the K and the V cache (names of :data:`~kvmerge_local.defaults.KV_TYPE_NAMES`)."""

    type_k: str = "f16"
    type_v: str = "f16"

    def __post_init__(self) -> None:
        for t in (self.type_k, self.type_v):
            if t not in KV_TYPE_NAMES:
                raise ValueError(f"unknown cache type {t!r}; known: {', '.join(KV_TYPE_NAMES)} "
                                 "(one for K and V, or K/V such as q8_0/q4_0)")

    @classmethod
    def parse(cls, value: KVStorage | str) -> KVStorage:
        """``"q8_0"`` (K and V) or ``"q8_0/q4_0"`` (K/V); ValueError naming the known types otherwise."""
        if isinstance(value, KVStorage):
            return value
        parts = str(value).strip().split("/")
        if len(parts) > 2:
            raise ValueError(f"a cache type is one type or K/V (such as q8_0/q4_0), got {value!r}")
        return cls(parts[0].strip(), parts[-1].strip())

    @property
    def name(self) -> str:
        """``"q8_0"`` when K and V share a type, else ``"q8_0/q4_0"`` (what :meth:`parse` reads back)."""
        return self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"

    @property
    def ratio(self) -> float:
        """Bytes per cell relative to an f16 K and V cache of the same model (head_dim a multiple of 32)."""
        return (_bits(self.type_k) + _bits(self.type_v)) / (2 * _bits("f16"))

    @property
    def quantized_v(self) -> bool:
        """A quantized V cache needs flash attention in llama.cpp."""
        return self.type_v in ("q8_0", "q4_0")

    def __str__(self) -> str:
        return self.name


#: Storages a memory budget chooses from, most precise (largest) first.  ``q4_0`` keys only where llama.cpp
#: stores them Hadamard-rotated (:func:`ladder_for`).
LADDER = (KVStorage("f16", "f16"), KVStorage("q8_0", "f16"), KVStorage("q8_0", "q8_0"), KVStorage("q8_0", "q4_0"),
          KVStorage("q4_0", "q4_0"))


def ladder_for(head_dim: int, flash_attn: bool, rotated: bool) -> tuple[KVStorage, ...]:
    """The storages of :data:`LADDER` a context can open and the product trusts: quantized rows need ``head_dim``
    to be a multiple of the 32-element block, a quantized V needs flash attention (llama.cpp), and 4-bit keys
    are used only when ``rotated`` (llama.cpp Hadamard-rotates quantized heads: ``head_dim % 64 == 0`` and
    ``LLAMA_ATTN_ROT_DISABLE`` unset; ``codec.hadamard.cache_rot_size``), because unrotated keys lose the most
    to per-token 4-bit blocks (docs/MEMORY.md)."""
    def ok(t: str, is_v: bool) -> bool:
        if t not in ("q8_0", "q4_0"):
            return True
        if t == "q4_0" and not is_v and not rotated:
            return False
        return head_dim % 32 == 0 and (flash_attn or not is_v)
    return tuple(s for s in LADDER if ok(s.type_k, False) and ok(s.type_v, True))


@dataclass(frozen=True)
class MemoryPlan:
    """How a memory budget is met: ``storage`` for the cache and ``budget``, the fraction of cells to keep."""

    memory: float
    storage: KVStorage
    budget: Budget

    @classmethod
    def for_fraction(cls, memory: float | str, ladder: tuple[KVStorage, ...] = LADDER) -> MemoryPlan:
        """The plan for ``memory`` in (0, 1] of the f16 full cache's bytes: the first storage of ``ladder`` whose
        full cache fits, else the last one (the smallest) keeping ``memory / ratio`` of the cells."""
        m = memory
        if isinstance(m, str):
            try:
                m = float(m)
            except ValueError:
                raise ValueError(f"memory must be a fraction in (0, 1] of the f16 cache, got {memory!r}") from None
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0.0 < float(m) <= 1.0:
            raise ValueError(f"memory must be a fraction in (0, 1] of the f16 cache, got {memory!r}")
        if not ladder:
            raise ValueError("the storage ladder is empty")
        m = float(m)
        for st in ladder:
            if st.ratio <= m + 1e-12:
                return cls(m, st, Budget(1.0))
        smallest = min(ladder, key=lambda s: s.ratio)
        return cls(m, smallest, Budget(round(m / smallest.ratio, 4)))

    def __str__(self) -> str:
        return f"{100 * self.memory:g}% memory = {self.storage} cache, {100 * self.budget.value:g}% of the cells"


def kv_type_arg(value: str) -> str:
    """argparse ``type=`` for ``--kv-type``: the storage's name, or the parse error as the option's message."""
    import argparse  # noqa: PLC0415

    try:
        return KVStorage.parse(value).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
