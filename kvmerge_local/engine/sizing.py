"""The memory plan of a model's context: :class:`~kvmerge_local.memory.MemoryPlan` on the storages that context
can open, with 4-bit keys only where llama.cpp stores quantized keys Hadamard-rotated (docs/MEMORY.md)."""
from __future__ import annotations

from ..codec.hadamard import cache_rot_size
from ..codec.types import TYPE_IDS
from ..memory import MemoryPlan, ladder_for


def plan_memory(memory: float, head_dim: int, flash_attn: bool = True) -> MemoryPlan:
    """The plan for ``memory`` (a fraction in (0, 1] of the f16 full cache's bytes) on a model whose heads have
    ``head_dim`` elements, in a context with or without flash attention (this process's environment decides
    whether llama.cpp rotates: ``LLAMA_ATTN_ROT_DISABLE``)."""
    rotated = cache_rot_size(TYPE_IDS["q4_0"], head_dim, "k") > 0
    return MemoryPlan.for_fraction(memory, ladder_for(head_dim, flash_attn, rotated))
