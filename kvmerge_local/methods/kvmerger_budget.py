"""KVMerger's budget mode: the merging sets come from adjacency-constrained agglomerative clustering to exactly
``m`` sets instead of the paper's threshold (the product default, ``kvmerger+budget``; defaults.py says why)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..kernels.cluster import budget_runs
from .kvmerger import KVMerger

log = logging.getLogger(__name__)


@dataclass
class KVMergerBudget(KVMerger):
    """KVMerger whose merging sets are clustered to exactly ``m`` (budget mode) instead of thresholded.

    Step 3: starting from singletons, repeatedly merge the most similar adjacent pair of sets (cosine of neighbouring keys, protected cells never merge) until ``m`` sets remain
    (kernels/cluster.py ``budget_runs``).  ``refuse_below_epsilon=True`` stops merging at ``epsilon`` and evicts
    the lowest-evidence sets instead.  Steps 1, 2 and 4-7 (pivot, Gaussian weights, positions) and every other
    parameter are :class:`~kvmerge_local.methods.kvmerger.KVMerger`'s.
    """

    refuse_below_epsilon: bool = False
    name = "kvmerger+budget"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.refuse_below_epsilon, bool):
            raise ValueError(f"KVMergerBudget.refuse_below_epsilon must be a bool, got {self.refuse_below_epsilon!r}")

    def runs(self, keys, evidence, m: int):
        """Merging sets as runs ``(start, end)`` int32[L, H, m], clustered to exactly ``m`` sets."""
        return budget_runs(keys, self.protected(evidence, m), evidence, m, float(self.epsilon), self.refuse_below_epsilon)
