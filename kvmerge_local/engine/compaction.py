"""One compaction of the document cache, with the bookkeeping that the llama.cpp state does not carry.

Per (layer, KV head, cell) the engine tracks (:class:`CacheBook`):

- ``doc_pos``: the original token index the cell stands for (the pivot for a merged cell) -- what the UI
  plots and what methods see as positions;
- ``rope_pos``: the RoPE position the cached key is rotated to (equal to ``doc_pos`` until positions are
  re-indexed);
- ``evidence``: attention evidence carried from earlier chunks (a kept cell keeps its own, a merged cell
  gets the sum of its members': :func:`carry_evidence`).

:func:`compact` reads the cache, plans with the method on document positions, turns the plan's slot
positions into RoPE positions (each slot keeps its pivot's), optionally re-indexes (slot ``j`` -> position
``j``, keys re-rotated per head by :mod:`.positions`), and writes the result, restoring the original cache
if anything fails.  An identity plan (``full``, or a budget of at least N cells) is not applied at all.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..bridge import KVBridge, KVState, apply_plan_to_state
from ..errors import KVMergeError
from ..plan import Plan
from .positions import RopeParams, rerotate_state_keys

log = logging.getLogger(__name__)


@dataclass
class CacheBook:
    """doc_pos, rope_pos: int32[L, H, N]; evidence: float32[L, H, N] (all in the cache's blob order)."""

    doc_pos: np.ndarray
    rope_pos: np.ndarray
    evidence: np.ndarray

    def __post_init__(self) -> None:
        if self.doc_pos.ndim != 3 or self.doc_pos.shape != self.rope_pos.shape or \
                self.doc_pos.shape != self.evidence.shape:
            raise ValueError(f"CacheBook arrays must share one [L, H, N] shape, got {self.doc_pos.shape}, "
                             f"{self.rope_pos.shape}, {self.evidence.shape}")
        self.doc_pos = np.ascontiguousarray(self.doc_pos, dtype=np.int32)
        self.rope_pos = np.ascontiguousarray(self.rope_pos, dtype=np.int32)
        self.evidence = np.ascontiguousarray(self.evidence, dtype=np.float32)

    @classmethod
    def empty(cls, n_layer: int, n_kv_head: int) -> CacheBook:
        z = np.zeros((n_layer, n_kv_head, 0), np.int32)
        return cls(z, z.copy(), np.zeros((n_layer, n_kv_head, 0), np.float32))

    @property
    def n(self) -> int:
        return int(self.doc_pos.shape[2])

    def append(self, doc_pos: np.ndarray, rope_pos: np.ndarray) -> None:
        """Add freshly decoded tokens (same layout in every head): int[n] document and RoPE positions."""
        L, H, _ = self.doc_pos.shape
        d = np.broadcast_to(np.asarray(doc_pos, np.int32), (L, H, len(doc_pos)))
        r = np.broadcast_to(np.asarray(rope_pos, np.int32), (L, H, len(rope_pos)))
        self.doc_pos = np.concatenate([self.doc_pos, d], axis=2)
        self.rope_pos = np.concatenate([self.rope_pos, r], axis=2)
        self.evidence = np.concatenate([self.evidence, np.zeros(d.shape, np.float32)], axis=2)


def carry_evidence(plan: Plan, evidence: np.ndarray) -> np.ndarray:
    """float32[L, H, m]: ``new_ev[l, h, j] = sum of evidence[l, h, src]`` over slot j's sources (with a
    non-zero key weight), i.e. a kept cell carries its evidence and a merged cell its members' sum."""
    return plan.carry_evidence(evidence)


def slot_rope_positions(plan: Plan, book: CacheBook) -> np.ndarray:
    """int32[L, H, m]: the RoPE position of each slot's key = that of its pivot (``plan.pos`` is a
    document position; the pivot is the cell of (l, h) holding that document position)."""
    L, H, N = book.doc_pos.shape
    lh = np.arange(L * H, dtype=np.int64).reshape(L, H, 1) << 32
    keys = (lh + book.doc_pos).reshape(-1)
    want = (lh + plan.pos).reshape(-1)
    idx = np.searchsorted(keys, want)
    if np.any(idx >= keys.size) or np.any(keys[np.minimum(idx, keys.size - 1)] != want):
        raise KVMergeError("plan positions do not match the cache's document positions")
    return book.rope_pos.reshape(-1)[idx].reshape(plan.pos.shape).astype(np.int32)


def float_views(st: KVState) -> tuple[np.ndarray, np.ndarray]:
    """K and V as arrays the methods accept ([L, H, N, d] float16/float32).

    f16/f32 caches: the state's own views (no copy).  bf16 and quantized K is converted layer by layer
    into one float16 array (quantized keys stay in their Hadamard-rotated basis: cosines, distances and
    weighted sums do not change under an orthonormal rotation).  The planners read values only for their
    shape, so a bf16/quantized V is passed as a zero-stride float16 view instead of being converted.
    """
    from .. import codec  # noqa: PLC0415

    L, H, N = st.geom.n_layer, st.geom.n_kv_head, st.n_cells
    d = st.geom.head_dim

    def convert(a: np.ndarray, t: int) -> np.ndarray:
        out = np.empty((L, H, N, d), np.float16)
        for l in range(L):
            if a.dtype == np.uint16:
                out[l] = codec.bf16_bits_to_f32_array(a[l])
            else:
                out[l] = codec.dequantize_rows(np.ascontiguousarray(a[l]).reshape(H * N, -1), t).reshape(H, N, d)
        return out

    k = st.k4 if st.k4.dtype in (np.float16, np.float32) else convert(st.k4, st.k_type)
    v = st.v4 if st.v4.dtype in (np.float16, np.float32) else np.broadcast_to(np.zeros(1, np.float16), (L, H, N, d))
    return k, v


@dataclass
class CompactResult:
    """What one compaction did: cells before/after, whether positions were re-indexed, seconds."""

    n_before: int
    n_after: int
    reindexed: bool
    seconds: float


def compact(bridge: KVBridge, method, book: CacheBook, m: int, *, reindex: bool, rope: RopeParams | None,
            evidence_on: bool) -> tuple[CacheBook, CompactResult]:
    """Compact the cache of ``bridge`` to ``m`` cells with ``method``; returns the new book and a report.

    ``book`` must describe the cache cell for cell (blob order).  With ``reindex`` the slots get
    positions ``0..m-1`` and every head's key is re-rotated by its own delta (``rope`` required).
    On failure the original cache is written back and the exception propagates (the book is unchanged).
    """
    t0 = time.perf_counter()
    st = bridge.read()
    if st.n_cells != book.n:
        raise KVMergeError(f"the cache holds {st.n_cells} cells but the engine tracks {book.n}")
    ev = book.evidence + bridge.evidence(st) if evidence_on else book.evidence
    k, v = float_views(st)
    plan = method.plan(k, v, book.doc_pos, ev, int(m))
    rope_pos = slot_rope_positions(plan, book)
    new_book = CacheBook(plan.pos, rope_pos, carry_evidence(plan, ev))
    if plan.is_identity() and not (reindex and np.any(rope_pos != np.arange(plan.m, dtype=np.int32))):
        # ``full``, or a budget >= N: the cache already is the result -- nothing to apply or write
        if evidence_on:
            bridge.reset_evidence()
        res = CompactResult(st.n_cells, plan.m, reindex, time.perf_counter() - t0)
        log.info("compaction of %d cells is the identity: nothing written (%.3fs)", res.n_before, res.seconds)
        return new_book, res
    # everything up to ``replace`` works on the new blob only; ``replace`` writes ``st`` back if refused
    wplan = Plan(plan.n_in, plan.offsets, plan.src, plan.wk, plan.wv, rope_pos)
    wplan.validate()
    new = apply_plan_to_state(st, wplan)
    if reindex:
        if rope is None:
            raise ValueError("re-indexing needs the model's RoPE parameters")
        target = np.arange(plan.m, dtype=np.int32)
        rerotate_state_keys(new, target[None, None, :] - rope_pos, rope)
        new.pos[:] = target
        new_book.rope_pos = np.ascontiguousarray(np.broadcast_to(target, rope_pos.shape))
    bridge.replace(new, st)
    if evidence_on:
        bridge.reset_evidence()
    res = CompactResult(st.n_cells, plan.m, reindex, time.perf_counter() - t0)
    log.info("compacted %d -> %d cells%s in %.3fs", res.n_before, res.n_after, " (re-indexed)" if reindex else "",
             res.seconds)
    return new_book, res
