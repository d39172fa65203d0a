"""TOVA (Oren et al. 2024): the last query's attention, averaged over the heads of a layer."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .base import Selection, _check_nonneg_int

log = logging.getLogger(__name__)


@dataclass
class TOVA(Selection):
    """Per layer: keep the top ``m`` cells by the last query's attention (evidence kind "last") averaged
    over the layer's KV heads; every head of a layer gets the same layout.  The newest cell is always
    kept; ``n_sink`` (default 0, as in the paper) optionally protects the first cells.
    """

    n_sink: int = 0
    name = "tova"
    evidence_kind = "last"

    def __post_init__(self):
        _check_nonneg_int(self, "n_sink")

    def scores(self, keys, positions, evidence, m: int) -> np.ndarray:
        return evidence.mean(axis=1, keepdims=True, dtype=np.float32)
