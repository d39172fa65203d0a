"""CaM (Zhang et al., ICML 2024, seed 003): merge the values of evicted cells into kept ones."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..kernels.merge import cam_fill, cam_merge_mask, csr_offsets
from ..plan import Plan
from .base import Method, Selection, _check_nonneg_int
from .streaming_llm import StreamingLLM

log = logging.getLogger(__name__)


@dataclass
class CaM(Method):
    """Cache merging on top of a selection method ``base`` (Algorithm 1, Eq. 14-15).

    1. ``base`` decides the kept and evicted cells.
    2. Each evicted cell ``i`` targets ``T_i``: the next ``merge_budget`` kept cells after it.
    3. Eq. 14: ``M_i ~ Bernoulli(clamp(A_i / mean(A_{T_i}), 0, 1))`` with ``A`` the evidence and draws
       from ``numpy.random.default_rng(seed)`` (one uniform per (layer, head, cell): reproducible).
    4. Eq. 15: ``V_t <- V_t + M_i V_i / |T_i|`` for ``t`` in ``T_i``.  Keys are never changed.

    Evidence: whatever ``base`` needs; when ``base`` needs none (StreamingLLM, the paper's main setting)
    CaM asks for "all" -- the accumulated attention ``A_bar`` of Eq. 14 (cumulative over queries).
    """

    base: Selection = field(default_factory=StreamingLLM)
    merge_budget: int = 32
    seed: int = 0
    name = "cam"

    def __post_init__(self):
        if not isinstance(self.base, Selection):
            raise ValueError(f"CaM.base must be a selection method, got {type(self.base).__name__}")
        _check_nonneg_int(self, "merge_budget", minimum=1)
        _check_nonneg_int(self, "seed")

    @property
    def evidence_kind(self) -> str:
        return "all" if self.base.evidence_kind == "none" else self.base.evidence_kind

    @property
    def window(self) -> int:
        return self.base.window

    def draws(self, shape) -> np.ndarray:
        """The uniform draws float32[L, H, N] behind the Bernoulli masks (seeded)."""
        return np.random.default_rng(self.seed).random(shape, dtype=np.float32)

    def _plan(self, keys, values, positions, evidence, m: int) -> Plan:
        keep = self.base.select(keys, values, positions, evidence, m)
        merged, extra = cam_merge_mask(keep, evidence, self.draws(evidence.shape), self.merge_budget)
        offsets = csr_offsets(extra + 1)
        nnz = int(offsets[-1, -1, -1])
        src = np.empty(nnz, np.int32)
        wk = np.empty(nnz, np.float32)
        wv = np.empty(nnz, np.float32)
        pos = np.empty(keep.shape, np.int32)
        cam_fill(keep, merged, positions, self.merge_budget, offsets, src, wk, wv, pos)
        return Plan(n_in=keys.shape[2], offsets=offsets, src=src, wk=wk, wv=wv, pos=pos)
