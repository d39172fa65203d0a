"""KVMerger (Wang et al. 2024, arXiv 2407.08454, seeds 000-002): adaptive merging of similar keys.

This file is the paper's method (Algorithm 1, threshold merging sets).  The budget-mode variant
(:class:`~kvmerge_local.methods.kvmerger_budget.KVMergerBudget`) changes only how the merging sets are found;
the broad-attention layers of the paper are a wrapper press
(:class:`~kvmerge_local.methods.skip_layers.SkipLayers`).
"""
from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

import numpy as np

from ..kernels.cluster import threshold_runs
from ..kernels.merge import csr_offsets, gaussian_runs_fill
from ..kernels.select import protected_mask
from ..kernels.similarity import adjacent_cosine
from ..kernels.strided import flat_view
from ..plan import Plan
from .base import EVIDENCE_KINDS, Method, _check_nonneg_int, protected_counts

log = logging.getLogger(__name__)


@dataclass
class KVMerger(Method):
    """KVMerger as in the paper: threshold merging sets (Algorithm 1), Gaussian-kernel merging.

    Formulas and this project's choices: docs/ALGORITHMS.md.

    1. Protected singletons: first ``n_sink``, last ``n_recent`` and the ``k_top`` highest-evidence
       cells (int count, or a float in (0, 1) = fraction of ``m``), clipped to fit ``m``.
    2. ``s_i = cos(k_i, k_{i+1})`` per (layer, head) (the paper's key-similarity observation).
    3. Merging sets = runs of consecutive cells: grow a set while ``s_i > epsilon``, then evict the
       lowest-evidence sets / split the least similar merges to get exactly ``m`` (kernels/cluster.py).
    4. Pivot = the member with the largest evidence (ties: newest) -- the paper's attention pivot.
    5. Gaussian kernel weights ``g_i = exp(-||k_p - k_i||^2 / (2 sigma^2))``, ``w_i = g_i / sum g``;
       ``sigma`` a float (paper's ablation: about 5 for Llama-2-7B) or "rms"
       (``sigma^2 = mean_S ||k_p - k_i||^2``, scale free).
    6. ``k_hat = sum w_i k_i``; ``v_hat = sum w_i v_i``, times ``|S|`` when ``value_scale="size"``.
    7. The slot carries the pivot's position.

    Evidence: ``evidence`` picks the kind ("window" by default, with ``window`` queries; "all"; "reconstruct";
    "none" for none at all -- then every cell has evidence 0: pivots are the newest members, ``k_top`` ties
    go to the newest cells and eviction to the oldest sets).  Given no evidence array, zeros are used.
    """

    epsilon: float = 0.75
    sigma: float | str = "rms"
    value_scale: str = "none"
    k_top: int | float = 0.1
    n_sink: int = 4
    n_recent: int = 32
    window: int = 32
    evidence: str = "window"
    name = "kvmerger"
    needs_evidence = False

    def __post_init__(self):
        cls = type(self).__name__
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, numbers.Real) or not -1.0 <= self.epsilon <= 1.0:
            raise ValueError(f"{cls}.epsilon must be a cosine in [-1, 1], got {self.epsilon!r}")
        if self.sigma != "rms" and (isinstance(self.sigma, (bool, str)) or not isinstance(self.sigma, numbers.Real)
                                    or not self.sigma > 0):
            raise ValueError(f"{cls}.sigma must be a positive float or 'rms', got {self.sigma!r}")
        if self.value_scale not in ("none", "size"):
            raise ValueError(f"{cls}.value_scale must be 'none' or 'size', got {self.value_scale!r}")
        if isinstance(self.k_top, bool) or not isinstance(self.k_top, numbers.Real) or self.k_top < 0:
            raise ValueError(f"{cls}.k_top must be an int >= 0 or a fraction in [0, 1), got {self.k_top!r}")
        if not isinstance(self.k_top, numbers.Integral) and self.k_top >= 1:
            raise ValueError(f"a fractional {cls}.k_top must be < 1, got {self.k_top!r}")
        _check_nonneg_int(self, "n_sink")
        _check_nonneg_int(self, "n_recent", "window", minimum=1)
        if self.evidence not in EVIDENCE_KINDS or self.evidence == "last":
            raise ValueError(f"{cls}.evidence must be 'window', 'all', 'reconstruct' or 'none', got {self.evidence!r}")

    @property
    def evidence_kind(self) -> str:
        return self.evidence

    def counts(self, m: int) -> tuple[int, int, int]:
        """(sinks, recent, k_top) actually protected with budget ``m``."""
        s, r = protected_counts(self.n_sink, self.n_recent, m)
        k = int(self.k_top) if isinstance(self.k_top, numbers.Integral) else int(round(self.k_top * m))
        return s, r, max(0, min(k, m - s - r))

    def protected(self, evidence: np.ndarray, m: int) -> np.ndarray:
        """bool[L, H, N]: the protected singletons of step 1 (``evidence`` float32[L, H, N])."""
        return protected_mask(evidence, *self.counts(m))

    def runs(self, keys, evidence, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Merging sets as runs ``(start, end)`` int32[L, H, m] (steps 1-3); ``keys`` a kernel array
        [L, H, N, d] (uint16 f16 bits or float32), ``evidence`` float32[L, H, N]."""
        return threshold_runs(adjacent_cosine(keys), self.protected(evidence, m), evidence, m, float(self.epsilon))

    def merge(self, keys, evidence, positions, start, end) -> Plan:
        """Steps 4-7: the plan merging each run ``start[l, h, j]:end[l, h, j]`` (int32[L, H, m]) into slot j.

        keys: kernel array [L, H, N, d]; evidence float32[L, H, N]; positions int32[L, H, N]."""
        offsets = csr_offsets(end - start)
        nnz = int(offsets[-1, -1, -1])
        src = np.empty(nnz, np.int32)
        wk = np.empty(nnz, np.float32)
        wv = np.empty(nnz, np.float32)
        pos = np.empty(start.shape, np.int32)
        rms = self.sigma == "rms"
        gaussian_runs_fill(*flat_view(keys, "keys"), evidence, positions, start, end, 0.0 if rms else float(self.sigma),
                           rms, self.value_scale == "size", offsets, src, wk, wv, pos)
        return Plan(n_in=keys.shape[2], offsets=offsets, src=src, wk=wk, wv=wv, pos=pos)

    def _plan(self, keys, values, positions, evidence, m: int) -> Plan:
        ev = np.zeros(keys.shape[:3], np.float32) if evidence is None else np.ascontiguousarray(evidence)
        start, end = self.runs(keys, ev, m)
        return self.merge(keys, ev, positions, start, end)
