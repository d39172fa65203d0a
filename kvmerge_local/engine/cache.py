"""The document cache: one object for the compressed document a session holds (in the spirit of mlx-lm's
``cache.py``).

The llama.cpp context holds the cells' K/V and one position per cell; :class:`DocumentCache` holds
everything else about them, per (layer, KV head, cell) in the cache's blob order:

- ``doc_pos`` int32[L, H, N]: the original token index the cell stands for (the pivot for a merged cell) --
  what the UI plots and what methods see as positions;
- ``rope_pos`` int32[L, H, N]: the RoPE position the cached key is rotated to (equal to ``doc_pos`` until
  positions are re-indexed);
- ``evidence`` float32[L, H, N]: attention evidence carried from earlier chunks (a kept cell keeps its own,
  a merged cell gets the sum of its members': :meth:`Plan.carry_evidence`),

and per document: its token ids (``tokens`` int32[n], BOS and chat head included; ``replayed`` of them were
replayed for KVzip scores), ``n_tokens`` prefilled so far, name, sha256, pages, the text tail and last token id
for the question seam, and the counters of how it was made.  ``nbytes`` is the cells' K/V size.

:meth:`compact` is the engine's one compaction step (plan on document positions with the method, then
:meth:`KVBridge.compact` with each slot's RoPE position); :meth:`save`/:meth:`load` are the one place the
saved-cache file (:mod:`.saved`) is written and read; :attr:`state`/:attr:`meta_state`/:meth:`from_state`
are the arrays and the metadata that round-trip through it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bridge import KV_TYPES, KVBridge, KVGeometry, KVState, LlamaContext, float_views, parse_state
from ..errors import KVMergeError, UnsupportedCacheError
from ..plan import Plan
from .saved import SavedCacheError, SavedInfo, check_model, read_saved, write_saved

log = logging.getLogger(__name__)

#: Characters of the document's text (or the chat's) kept for the question seam.
TAIL_CHARS = 256
_ARRAYS = ("doc_pos", "rope_pos", "evidence")


@dataclass
class CompactResult:
    """What one compaction did: cells before/after, whether positions were re-indexed, seconds."""

    n_before: int
    n_after: int
    reindexed: bool
    seconds: float


class DocumentCache:
    """See the module docstring.  ``k_type``/``v_type``: ggml type ids of the context's K and V cache."""

    def __init__(self, geom: KVGeometry, k_type: int, v_type: int) -> None:
        self.geom, self.k_type, self.v_type = geom, int(k_type), int(v_type)
        self.bytes_per_cell = geom.bytes_per_cell(self.k_type, self.v_type)
        L, H = geom.n_layer, geom.n_kv_head
        self.doc_pos = np.zeros((L, H, 0), np.int32)
        self.rope_pos = np.zeros((L, H, 0), np.int32)
        self.evidence = np.zeros((L, H, 0), np.float32)
        self.tokens, self.replayed = np.zeros(0, np.int32), 0
        self.n_tokens = 0
        self.name, self.sha256 = "", ""
        self.pages: list[tuple[int, int, int]] = []
        self.tail, self.last_id = "", None
        self.t_prefill = self.t_compact = 0.0
        self.n_compactions = self.n_reindex = 0

    @classmethod
    def for_context(cls, ctx: LlamaContext) -> DocumentCache:
        """An empty cache for the model and K/V cache types of ``ctx``."""
        return cls(ctx.model.geom, KV_TYPES[ctx.kv_type], KV_TYPES[ctx.type_v])

    # --- size ------------------------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        """Cells the document holds."""
        return int(self.doc_pos.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes of the document's K/V cells in the context."""
        return self.bytes_per_cell * self.n_cells

    def end(self) -> int:
        """The position after the document's last cell (where chat turns start); 0 when empty."""
        return int(self.rope_pos.max()) + 1 if self.n_cells else 0

    # --- growth and compaction -------------------------------------------------------------------------
    def append(self, doc_pos: np.ndarray, rope_pos: np.ndarray) -> None:
        """Add freshly decoded tokens (same layout in every head): int[n] document and RoPE positions."""
        L, H, _ = self.doc_pos.shape
        d = np.broadcast_to(np.asarray(doc_pos, np.int32), (L, H, len(doc_pos)))
        r = np.broadcast_to(np.asarray(rope_pos, np.int32), (L, H, len(rope_pos)))
        self.doc_pos = np.concatenate([self.doc_pos, d], axis=2)
        self.rope_pos = np.concatenate([self.rope_pos, r], axis=2)
        self.evidence = np.concatenate([self.evidence, np.zeros(d.shape, np.float32)], axis=2)

    def slot_rope_positions(self, plan: Plan) -> np.ndarray:
        """int32[L, H, m]: the RoPE position of each slot's key = that of its pivot (``plan.pos`` is a
        document position; the pivot is the cell of (l, h) holding that document position)."""
        L, H, N = self.doc_pos.shape
        lh = np.arange(L * H, dtype=np.int64).reshape(L, H, 1) << 32
        keys = (lh + self.doc_pos).reshape(-1)
        want = (lh + plan.pos).reshape(-1)
        idx = np.searchsorted(keys, want)
        if np.any(idx >= keys.size) or np.any(keys[np.minimum(idx, keys.size - 1)] != want):
            raise KVMergeError("plan positions do not match the cache's document positions")
        return self.rope_pos.reshape(-1)[idx].reshape(plan.pos.shape).astype(np.int32)

    def compact(self, bridge: KVBridge, method, m: int, *, reindex: bool, evidence_on: bool) -> CompactResult:
        """Compact the document in ``bridge``'s context to ``m`` cells with ``method``.

        The method plans on document positions (K/V from :func:`float_views`, evidence = the carried one plus,
        with ``evidence_on``, what the context accumulated since the last compaction); :meth:`KVBridge.compact`
        applies the plan with each slot at its pivot's RoPE position and, with ``reindex``, renumbers the slots
        0..m-1.  On failure the context keeps (or gets back) its cache and this object is unchanged.
        """
        t0 = time.perf_counter()
        st = bridge.planning_state()  # in place: the live keys, no state read; else the state blob
        if st.n_cells != self.n_cells:
            raise KVMergeError(f"the cache holds {st.n_cells} cells but the engine tracks {self.n_cells}")
        ev = self.evidence + bridge.evidence(st) if evidence_on else self.evidence
        k, v = float_views(st)
        plan = method.plan(k, v, self.doc_pos, ev, int(m))
        rope_pos = self.slot_rope_positions(plan)
        bridge.compact(plan, st=st, key_pos=rope_pos, reindex=reindex)
        if evidence_on:
            bridge.reset_evidence()
        self.doc_pos = np.ascontiguousarray(plan.pos, np.int32)
        self.evidence = np.ascontiguousarray(plan.carry_evidence(ev), np.float32)
        self.rope_pos = (np.ascontiguousarray(np.broadcast_to(np.arange(plan.m, dtype=np.int32), rope_pos.shape))
                         if reindex else rope_pos)
        res = CompactResult(st.n_cells, plan.m, reindex, time.perf_counter() - t0)
        self.t_compact += res.seconds
        self.n_compactions += 1
        self.n_reindex += int(reindex)
        log.info("compacted %d -> %d cells%s in %.3fs", res.n_before, res.n_after,
                 " (re-indexed)" if reindex else "", res.seconds)
        return res

    # --- state -----------------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, np.ndarray]:
        """The per-cell arrays: ``doc_pos``, ``rope_pos`` (int32[L, H, N]) and ``evidence`` (float32[L, H, N])."""
        return {name: getattr(self, name) for name in _ARRAYS}

    @property
    def meta_state(self) -> dict:
        """The document's metadata and counters, as the saved file's header stores them."""
        return {"document": {"name": self.name, "sha256": self.sha256, "n_tokens": self.n_tokens,
                             "pages": [list(p) for p in self.pages], "tail": self.tail, "last_id": self.last_id},
                "counters": {"t_prefill": self.t_prefill, "t_compact": self.t_compact,
                             "n_compactions": self.n_compactions, "n_reindex": self.n_reindex}}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], meta_state: dict, geom: KVGeometry, k_type: int,
                   v_type: int) -> DocumentCache:
        """The inverse of :attr:`state` and :attr:`meta_state` (arrays copied; ``tokens`` are not kept)."""
        c = cls(geom, k_type, v_type)
        shapes = {state[n].shape for n in _ARRAYS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[:2] != (geom.n_layer, geom.n_kv_head):
            raise ValueError(f"doc_pos, rope_pos and evidence must share one [{geom.n_layer}, {geom.n_kv_head}, N] "
                             f"shape, got {sorted(shapes)}")
        c.doc_pos = np.array(state["doc_pos"], np.int32)
        c.rope_pos = np.array(state["rope_pos"], np.int32)
        c.evidence = np.array(state["evidence"], np.float32)
        doc, cnt = meta_state.get("document") or {}, meta_state.get("counters") or {}
        c.n_tokens = int(doc.get("n_tokens", c.n_cells))
        c.tail, c.last_id = str(doc.get("tail", "")), doc.get("last_id")
        c.name, c.sha256 = str(doc.get("name", "")), str(doc.get("sha256", ""))
        c.pages = [tuple(int(x) for x in pg) for pg in doc.get("pages", [])]
        c.t_prefill, c.t_compact = float(cnt.get("t_prefill", 0.0)), float(cnt.get("t_compact", 0.0))
        c.n_compactions, c.n_reindex = int(cnt.get("n_compactions", 0)), int(cnt.get("n_reindex", 0))
        c.replayed = c.n_tokens  # the token ids are not saved: nothing can be replayed
        return c

    # --- files -----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, st: KVState, meta: dict) -> Path:
        """Write this cache and its cells ``st`` (the document's cells only) to ``path``; ``meta``: the
        session's part of the header (model, method, settings, stats).  Returns the path."""
        if st.n_cells != self.n_cells:
            raise KVMergeError(f"the state holds {st.n_cells} cells, the document {self.n_cells}")
        arrays = {"blob": np.array(st.blob, copy=True), **self.state}
        return write_saved(path, {**meta, **self.meta_state}, arrays)

    @staticmethod
    def read_meta(path: str | os.PathLike) -> SavedInfo:
        """The document's metadata and stats from a saved cache's header, without reading its cells (cheap:
        what the UI lists); raises :class:`SavedCacheError` for a missing or corrupt file."""
        return SavedInfo.read(path)

    @classmethod
    def load(cls, path: str | os.PathLike, geom: KVGeometry, *, model_sha256: str | None = None,
             model_label: str = "") -> tuple[DocumentCache, KVState, dict]:
        """Read a saved cache: (the document cache, its cells as a KVState, the file's header).

        Raises :class:`SavedCacheError` with a clear message for a missing, corrupt, truncated or foreign file
        (made for another model than ``model_sha256`` when given, wrong geometry, an unparsable state,
        positions that do not match its cells).
        """
        p = Path(path)
        meta, arrays = read_saved(p)
        if model_sha256 is not None:
            check_model(meta, model_sha256, model_label, p.name)
        if list(meta.get("geometry", [])) != [geom.n_layer, geom.n_kv_head, geom.head_dim]:
            raise SavedCacheError(f"{p.name}: cache geometry {meta.get('geometry')} does not match the model")
        try:
            st = parse_state(np.array(arrays["blob"], copy=True), geom)
        except (UnsupportedCacheError, ValueError) as exc:
            raise SavedCacheError(f"{p.name} holds no valid cache state ({exc})") from exc
        if arrays["doc_pos"].shape != (geom.n_layer, geom.n_kv_head, st.n_cells):
            raise SavedCacheError(f"{p.name} is corrupt (positions do not match its {st.n_cells} cells)")
        try:
            cache = cls.from_state(arrays, meta, geom, st.k_type, st.v_type)
        except (ValueError, TypeError, KeyError) as exc:
            raise SavedCacheError(f"{p.name} is corrupt ({exc})") from exc
        return cache, st, meta
