"""SnapKV (Li et al. 2024): observation-window attention, pooled, selects the prefix to keep."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..kernels.similarity import pool1d
from .base import Selection, _check_nonneg_int, protected_counts

log = logging.getLogger(__name__)


@dataclass
class SnapKV(Selection):
    """Per (layer, head): keep the observation window (last ``window`` cells) and the top ``m - window``
    others by the window's attention (evidence kind "window") smoothed by 1-D pooling of size
    ``kernel_size`` (``pooling`` "avg", zero padding counted as in SnapKV's ``avg_pool1d``, or "max").

    With ``m <= window`` only the newest ``m`` cells are kept.  ``n_sink`` (default 0) optionally
    protects the first cells.
    """

    window: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    n_sink: int = 0
    name = "snapkv"
    evidence_kind = "window"

    def __post_init__(self):
        _check_nonneg_int(self, "window", "kernel_size", minimum=1)
        _check_nonneg_int(self, "n_sink")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"SnapKV.pooling must be 'avg' or 'max', got {self.pooling!r}")

    def recent(self, m: int) -> int:
        return self.window

    def scores(self, keys, positions, evidence, m: int) -> np.ndarray:
        _, r = protected_counts(self.n_sink, self.window, m)
        ev = np.ascontiguousarray(evidence, dtype=np.float32)
        return pool1d(ev, ev.shape[2] - r, self.kernel_size, self.pooling == "max")
