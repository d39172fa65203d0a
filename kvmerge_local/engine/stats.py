"""What a session reports: :class:`Stats` after every step and :class:`IngestProgress` while ingesting."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PHASES = ("prefill", "compact")


def _check_nonneg(obj, names) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is None or v < 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be >= 0, got {v!r}")


@dataclass
class Stats:
    """Memory and time of a session.

    tokens_ingested: document tokens prefilled (BOS and template head included); doc_cells: cells the
    (compressed) document holds; chat_cells: cells held by chat turns; cells_in_use = doc_cells +
    chat_cells; kv_bytes_full: bytes a full cache of tokens_ingested + chat_cells would need (same cache types);
    kv_bytes_f16: what that full cache would need in f16 (the reference of a memory budget);
    kv_bytes_now: bytes of the cells in use; ratio = kv_bytes_now / kv_bytes_full (1.0 = nothing saved);
    t_prefill / t_compact / t_decode: seconds spent decoding the document, compacting, answering.
    """

    tokens_ingested: int = 0
    cells_in_use: int = 0
    n_ctx: int = 0
    kv_bytes_full: int = 0
    kv_bytes_f16: int = 0
    kv_bytes_now: int = 0
    ratio: float = 1.0
    t_prefill: float = 0.0
    t_compact: float = 0.0
    t_decode: float = 0.0
    method: str = ""
    budget: float | int = 0.5
    n_compactions: int = 0
    n_reindex: int = 0
    doc_cells: int = 0
    chat_cells: int = 0
    tokens_generated: int = 0
    position_policy: str = "auto"
    kv_type: str = "f16"
    n_ctx_train: int = 0
    bytes_per_cell: int = 0
    model: str = ""
    document: str = ""

    def __post_init__(self) -> None:
        _check_nonneg(self, ("tokens_ingested", "cells_in_use", "n_ctx", "kv_bytes_full", "kv_bytes_f16", "kv_bytes_now",
                             "t_prefill", "t_compact", "t_decode", "n_compactions", "n_reindex", "doc_cells",
                             "chat_cells", "tokens_generated", "bytes_per_cell"))
        if not 0.0 <= self.ratio <= 1.0 + 1e-9:
            raise ValueError(f"Stats.ratio must be in [0, 1], got {self.ratio}")

    @property
    def kv_bytes_saved(self) -> int:
        return max(0, self.kv_bytes_full - self.kv_bytes_now)

    @property
    def memory_ratio(self) -> float:
        """kv_bytes_now / kv_bytes_f16: the cache's bytes against an f16 cache of every token (1.0 if unknown)."""
        return self.kv_bytes_now / self.kv_bytes_f16 if self.kv_bytes_f16 else self.ratio

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.t_decode if self.t_decode > 0 else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kv_bytes_saved"] = self.kv_bytes_saved
        d["memory_ratio"] = round(self.memory_ratio, 6)
        d["tokens_per_second"] = round(self.tokens_per_second, 3)
        return d

    def summary(self) -> str:
        """One line for people: cells, memory saved, times."""
        mib = 1 << 20
        f16 = "" if self.kv_type == "f16" else f", {100 * self.memory_ratio:.0f}% of an f16 full cache"
        return (f"{self.tokens_ingested} tokens -> {self.doc_cells} cells ({self.method}, budget {self.budget}, "
                f"{self.kv_type}); KV {self.kv_bytes_now / mib:.1f} MiB of {self.kv_bytes_full / mib:.1f} MiB "
                f"({100 * (1 - self.ratio):.0f}% saved{f16}); prefill {self.t_prefill:.2f}s, "
                f"compact {self.t_compact:.2f}s, decode {self.t_decode:.2f}s")


@dataclass(frozen=True)
class IngestProgress:
    """Progress of :meth:`Session.ingest`: ``done_tokens`` of ``total_tokens`` prefilled, ``phase``
    ("prefill" after a chunk, "compact" after a compaction), cells in use, compactions so far, seconds."""

    done_tokens: int
    total_tokens: int
    phase: str
    cells: int = 0
    n_compactions: int = 0
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"IngestProgress.phase must be one of {PHASES}, got {self.phase!r}")
        if not 0 <= self.done_tokens <= self.total_tokens:
            raise ValueError(f"IngestProgress: done_tokens {self.done_tokens} not in [0, {self.total_tokens}]")
        _check_nonneg(self, ("cells", "n_compactions", "elapsed"))

    @property
    def fraction(self) -> float:
        return self.done_tokens / self.total_tokens if self.total_tokens else 1.0
