"""KVMerger (Wang et al. 2024, arXiv 2407.08454, seeds 000-002): adaptive merging of similar keys."""
from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field

import numpy as np

from ..kernels.cluster import budget_runs, threshold_runs
from ..kernels.merge import csr_offsets, gaussian_runs_fill
from ..kernels.select import protected_mask
from ..kernels.similarity import adjacent_cosine
from ..kernels.strided import flat_view
from ..plan import Plan
from .base import EVIDENCE_KINDS, Method, _check_nonneg_int, protected_counts
from .snapkv import SnapKV

log = logging.getLogger(__name__)


@dataclass
class KVMerger(Method):
    """KVMerger as fixed by docs/ALGORITHMS.md (paper Algorithm 1 and the Gaussian merging function).

    1. Protected singletons: first ``n_sink``, last ``n_recent`` and the ``k_top`` highest-evidence
       cells (int count, or a float in (0, 1) = fraction of ``m``), clipped to fit ``m``.
    2. ``s_i = cos(k_i, k_{i+1})`` per (layer, head) (the paper's key-similarity observation).
    3. Merging sets = runs of consecutive cells: ``mode="threshold"`` (paper Algorithm 1: grow a set
       while ``s_i > epsilon``, then evict the lowest-evidence sets / split the least similar merges to
       get exactly ``m``) or ``mode="budget"`` (adjacency-constrained agglomerative clustering to ``m``;
       ``refuse_below_epsilon`` stops at ``epsilon`` and evicts instead).  See kernels/cluster.py.
    4. Pivot = the member with the largest evidence (ties: newest) -- the paper's attention pivot.
    5. Gaussian kernel weights ``g_i = exp(-||k_p - k_i||^2 / (2 sigma^2))``, ``w_i = g_i / sum g``;
       ``sigma`` a float (paper's ablation: about 5 for Llama-2-7B) or "rms"
       (``sigma^2 = mean_S ||k_p - k_i||^2``, scale free).
    6. ``k_hat = sum w_i k_i``; ``v_hat = sum w_i v_i``, times ``|S|`` when ``value_scale="size"``.
    7. The slot carries the pivot's position.
    8. ``skip_layers``: layers (negative = from the end; the paper's broad-attention layers are
       ``(0, 1, -1)``) use SnapKV selection with the same window instead of merging.

    Evidence: ``evidence`` picks the kind ("window" by default, with ``window`` queries; "all"; "none"
    for none at all -- then every cell has evidence 0: pivots are the newest members, ``k_top`` ties go
    to the newest cells and eviction to the oldest sets).
    """

    mode: str = "threshold"
    epsilon: float = 0.75
    refuse_below_epsilon: bool = False
    sigma: float | str = "rms"
    value_scale: str = "none"
    k_top: int | float = 0.1
    n_sink: int = 4
    n_recent: int = 32
    window: int = 32
    evidence: str = "window"
    skip_layers: tuple = field(default_factory=tuple)
    name = "kvmerger"
    needs_evidence = False

    def __post_init__(self):
        if self.mode not in ("threshold", "budget"):
            raise ValueError(f"KVMerger.mode must be 'threshold' or 'budget', got {self.mode!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, numbers.Real) or not -1.0 <= self.epsilon <= 1.0:
            raise ValueError(f"KVMerger.epsilon must be a cosine in [-1, 1], got {self.epsilon!r}")
        if isinstance(self.sigma, str):
            if self.sigma != "rms":
                raise ValueError(f"KVMerger.sigma must be a positive float or 'rms', got {self.sigma!r}")
        elif isinstance(self.sigma, bool) or not isinstance(self.sigma, numbers.Real) or not self.sigma > 0:
            raise ValueError(f"KVMerger.sigma must be a positive float or 'rms', got {self.sigma!r}")
        if self.value_scale not in ("none", "size"):
            raise ValueError(f"KVMerger.value_scale must be 'none' or 'size', got {self.value_scale!r}")
        if isinstance(self.k_top, bool) or not isinstance(self.k_top, numbers.Real) or self.k_top < 0:
            raise ValueError(f"KVMerger.k_top must be an int >= 0 or a fraction in [0, 1), got {self.k_top!r}")
        if not isinstance(self.k_top, numbers.Integral) and self.k_top >= 1:
            raise ValueError(f"a fractional KVMerger.k_top must be < 1, got {self.k_top!r}")
        _check_nonneg_int(self, "n_sink")
        _check_nonneg_int(self, "n_recent", "window", minimum=1)
        if self.evidence not in EVIDENCE_KINDS or self.evidence == "last":
            raise ValueError(f"KVMerger.evidence must be 'window', 'all' or 'none', got {self.evidence!r}")
        if not isinstance(self.refuse_below_epsilon, bool):
            raise ValueError("KVMerger.refuse_below_epsilon must be a bool")
        try:
            self.skip_layers = tuple(int(x) for x in self.skip_layers)
        except (TypeError, ValueError):
            raise ValueError(f"KVMerger.skip_layers must be a sequence of ints, got {self.skip_layers!r}") from None
        if self.skip_layers and self.evidence == "none":
            raise ValueError("KVMerger.skip_layers uses SnapKV, which needs evidence")

    @property
    def evidence_kind(self) -> str:
        return self.evidence

    def counts(self, m: int) -> tuple[int, int, int]:
        """(sinks, recent, k_top) actually protected with budget ``m``."""
        s, r = protected_counts(self.n_sink, self.n_recent, m)
        k = int(self.k_top) if isinstance(self.k_top, numbers.Integral) else int(round(self.k_top * m))
        return s, r, max(0, min(k, m - s - r))

    def skipped(self, n_layer: int) -> np.ndarray:
        """bool[n_layer]: layers that use SnapKV instead of merging (entries beyond the model are ignored,
        so one configuration serves models of any depth)."""
        out = np.zeros(n_layer, bool)
        for x in self.skip_layers:
            if -n_layer <= x < n_layer:
                out[x] = True
        return out

    def runs(self, keys, evidence, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Merging sets as runs ``(start, end)`` int32[L, H, m] (steps 1-3)."""
        s, r, k = self.counts(m)
        prot = protected_mask(evidence, s, r, k)
        if self.mode == "threshold":
            return threshold_runs(adjacent_cosine(keys), prot, evidence, m, float(self.epsilon))
        return budget_runs(keys, prot, evidence, m, float(self.epsilon), self.refuse_below_epsilon)

    def _plan(self, keys, values, positions, evidence, m: int) -> Plan:
        L, H, N, _ = keys.shape
        ev = np.zeros((L, H, N), np.float32) if evidence is None else np.ascontiguousarray(evidence)
        skip = self.skipped(L)
        merge_layers = np.flatnonzero(~skip)
        start = np.empty((L, H, m), np.int32)
        end = np.empty((L, H, m), np.int32)
        for sl in _layer_slices(merge_layers):
            start[sl], end[sl] = self.runs(keys[sl], ev[sl], m)
        snap = SnapKV(window=self.window)
        for sl in _layer_slices(np.flatnonzero(skip)):
            start[sl] = snap.select(keys[sl], None, positions[sl], ev[sl], m)
            end[sl] = start[sl] + 1
        offsets = csr_offsets(end - start)
        nnz = int(offsets[-1, -1, -1])
        src = np.empty(nnz, np.int32)
        wk = np.empty(nnz, np.float32)
        wv = np.empty(nnz, np.float32)
        pos = np.empty((L, H, m), np.int32)
        sigma = 0.0 if self.sigma == "rms" else float(self.sigma)
        gaussian_runs_fill(*flat_view(keys, "keys"), ev, positions, start, end, sigma, self.sigma == "rms",
                           self.value_scale == "size", offsets, src, wk, wv, pos)
        return Plan(n_in=N, offsets=offsets, src=src, wk=wk, wv=wv, pos=pos)


def _layer_slices(layers: np.ndarray) -> list[slice]:
    """Consecutive runs of sorted layer indices as slices (views, never copies of the cache)."""
    out: list[slice] = []
    for x in layers.tolist():
        if out and out[-1].stop == x:
            out[-1] = slice(out[-1].start, x + 1)
        else:
            out.append(slice(x, x + 1))
    return out
