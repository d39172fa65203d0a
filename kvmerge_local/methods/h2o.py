"""H2O (Zhang et al. 2023): heavy hitters by accumulated attention plus the recent window."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .base import Selection, _check_nonneg_int

log = logging.getLogger(__name__)


@dataclass
class H2O(Selection):
    """Per (layer, head): keep the last ``n_recent`` cells (None: ``m // 2``) and the ``m - n_recent``
    others with the largest attention accumulated over all prompt queries (evidence kind "all").

    ``n_sink`` (default 0, as in the paper) optionally protects the first cells too.
    """

    n_recent: int | None = None
    n_sink: int = 0
    name = "h2o"
    evidence_kind = "all"

    def __post_init__(self):
        _check_nonneg_int(self, "n_sink")
        if self.n_recent is not None:
            _check_nonneg_int(self, "n_recent", minimum=1)

    def recent(self, m: int) -> int:
        return max(1, m // 2 if self.n_recent is None else self.n_recent)

    def scores(self, keys, positions, evidence, m: int) -> np.ndarray:
        return evidence
