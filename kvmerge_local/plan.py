"""The compaction plan: the one contract between planners (methods) and the apply kernel.

A plan says, for every layer ``l``, KV head ``h`` and output slot ``j`` (``0 <= j < m``), which input
cells feed that slot and with which weights, and which token position the slot stands for.  Plans are
stored in CSR form so one kernel can apply selection (one source, weight 1) and merging (many sources)
alike:

- ``offsets: int64[n_layer, n_kv_head, m + 1]`` -- for (l, h), the sources of slot j are
  ``offsets[l, h, j] : offsets[l, h, j + 1]`` (indices into the flat arrays below).  ``offsets[l, h, 0]``
  is where (l, h) starts in the flat arrays and ``offsets[l, h, m]`` where it ends.
- ``src: int32[nnz]`` -- input cell index (``0 <= src < n_in``) of each source.
- ``wk: float32[nnz]`` -- weight of that source in the slot's key.
- ``wv: float32[nnz]`` -- weight of that source in the slot's value.
- ``pos: int32[n_layer, n_kv_head, m]`` -- the position the slot carries (the pivot's / kept token's
  original position).  Slots are ordered by ``pos`` ascending within each (l, h); the last slot of every
  (l, h) is the newest token.

A slot with exactly one source whose ``wk == wv == 1`` is a *copy*: the apply kernel moves its raw bytes
(exact for every cache type, quantized ones included).  Anything else is a *merge*, computed in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Plan:
    """A compaction plan for one sequence (see the module docstring for the layout)."""

    n_in: int
    offsets: np.ndarray  # int64[n_layer, n_kv_head, m + 1]
    src: np.ndarray  # int32[nnz]
    wk: np.ndarray  # float32[nnz]
    wv: np.ndarray  # float32[nnz]
    pos: np.ndarray  # int32[n_layer, n_kv_head, m]

    @property
    def n_layer(self) -> int:
        return int(self.pos.shape[0])

    @property
    def n_kv_head(self) -> int:
        return int(self.pos.shape[1])

    @property
    def m(self) -> int:
        return int(self.pos.shape[2])

    def validate(self) -> None:
        """Raise ValueError unless the plan is well formed (shapes, dtypes, index ranges, order)."""
        L, H, m = self.pos.shape
        if self.offsets.shape != (L, H, m + 1):
            raise ValueError(f"offsets shape {self.offsets.shape} != {(L, H, m + 1)}")
        if self.offsets.dtype != np.int64 or self.src.dtype != np.int32:
            raise ValueError("offsets must be int64 and src int32")
        if self.wk.dtype != np.float32 or self.wv.dtype != np.float32 or self.pos.dtype != np.int32:
            raise ValueError("wk, wv must be float32 and pos int32")
        nnz = self.src.shape[0]
        if self.wk.shape != (nnz,) or self.wv.shape != (nnz,):
            raise ValueError("src, wk and wv must have the same length")
        if np.any(np.diff(self.offsets, axis=2) < 1):
            raise ValueError("every slot needs at least one source")
        if nnz and (self.src.min() < 0 or self.src.max() >= self.n_in):
            raise ValueError(f"source index out of range [0, {self.n_in})")
        if m > 1 and np.any(np.diff(self.pos, axis=2) <= 0):
            raise ValueError("slot positions must be strictly increasing within each (layer, head)")

    def cell_positions(self) -> np.ndarray:
        """int32[m]: the position each llama.cpp cell carries (shared by all layers and heads).

        A cell's position only drives the causal mask and ``seq_pos_max``; K already carries RoPE.  We
        use the maximum over (layer, head) of the slot positions, so the last cell is the newest token.
        """
        return self.pos.max(axis=(0, 1)).astype(np.int32)

    def is_identity(self) -> bool:
        """True when every (l, h) keeps every input cell, in order, unchanged."""
        L, H, m = self.pos.shape
        if m != self.n_in or self.src.shape[0] != L * H * m:
            return False
        return bool(np.all(self.src.reshape(L, H, m) == np.arange(m)) and np.all(self.wk == 1) and np.all(self.wv == 1))

    def carry_evidence(self, evidence: np.ndarray) -> np.ndarray:
        """float32[L, H, m]: evidence for the compacted cells (docs/ALGORITHMS.md: a kept cell carries its own,
        a merged cell the sum of its members').  Members are the sources with a non-zero key weight, so
        CaM's value-only merges do not move evidence.  ``evidence``: float[L, H, n_in]."""
        L, H, m = self.pos.shape
        ev = np.asarray(evidence, np.float32)
        if ev.shape != (L, H, self.n_in):
            raise ValueError(f"evidence shape {ev.shape} != {(L, H, self.n_in)}")
        head = np.repeat(np.arange(L * H), np.diff(self.offsets.reshape(L * H, m + 1)[:, [0, -1]], axis=1)[:, 0])
        vals = np.where(self.wk != 0, ev.reshape(L * H, self.n_in)[head, self.src], np.float32(0))
        starts = self.offsets[:, :, :m].reshape(-1)
        out = np.add.reduceat(vals, starts) if vals.size else np.zeros(L * H * m, np.float32)
        return out.astype(np.float32).reshape(L, H, m)
