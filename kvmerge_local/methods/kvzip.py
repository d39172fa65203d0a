"""KVzip (Kim et al. 2025): query-agnostic eviction scored by how much the model needs each cell to
reconstruct the document.

After the document is prefilled, the engine replays it behind a "Repeat the previous context exactly."
prompt (in chunks, each later chunk cued by the previous chunk's last tokens), records for every cached cell
the MAXIMUM attention any replay query of any query head of its GQA group gives it, then removes the replay
tokens again (:mod:`kvmerge_local.engine.replay`).  That score is this method's evidence (kind
``"reconstruct"``); selection is then plain top-k per (layer, KV head) with ``n_sink`` first cells protected
(the paper protects sinks only; ``n_recent`` newest cells are protected too, 1 by default, as every method
here keeps the newest cell).

Parameters keep the paper's / kvpress's names: ``n_sink``, ``chunk_size`` (document tokens replayed per
pass).  ``step`` is ours: replay queries are decoded ``step`` at a time and the patch sums attention over
the queries of one decode call, so the score is the max over calls of those sums (``step=1`` is the exact
max; larger is faster).  Cost: the replay prefills the document a second time (plus ~15 prompt tokens per
chunk).  See docs/ALGORITHMS.md, section 9.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Selection, _check_nonneg_int


@dataclass
class KVzip(Selection):
    """Keep ``n_sink`` first cells, the ``n_recent`` newest, and the top ``m - n_sink - n_recent`` cells by
    their replay-attention score (evidence kind ``"reconstruct"``: float32[L, H, N], max over replay queries
    and the query heads of each KV head)."""

    n_sink: int = 4
    n_recent: int = 1
    chunk_size: int = 512
    step: int = 16
    name = "kvzip"
    evidence_kind = "reconstruct"

    def __post_init__(self):
        _check_nonneg_int(self, "n_sink")
        _check_nonneg_int(self, "n_recent", "chunk_size", "step", minimum=1)

    def recent(self, m: int) -> int:
        return self.n_recent

    def scores(self, keys, positions, evidence, m: int):
        return evidence
