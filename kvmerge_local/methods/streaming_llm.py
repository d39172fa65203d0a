"""StreamingLLM (Xiao et al. 2023): attention sinks plus a sliding window."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .base import Selection, _check_nonneg_int

log = logging.getLogger(__name__)


@dataclass
class StreamingLLM(Selection):
    """Keep the first ``n_sink`` cells and the last ``m - n_sink`` (same layout in every head).

    With ``m <= n_sink`` the newest cell still takes one slot and the first ``m - 1`` sinks the rest.
    """

    n_sink: int = 4
    name = "streaming_llm"
    evidence_kind = "none"

    def __post_init__(self):
        _check_nonneg_int(self, "n_sink")

    def recent(self, m: int) -> int:
        return max(1, m - self.n_sink)
