"""Save and load the compressed document cache of a session (the persistence half of ``Session``).

``save`` writes only the document's cells (chat turns are not saved) with the bookkeeping the engine needs
to continue (document and RoPE positions, carried evidence, the text tail for the question seam, pages)
and metadata (model sha256 and name, method and parameters, budget, document hash, stats).  ``restore``
checks everything -- file integrity, model sha256, geometry, cache types -- before it touches the
context, so a corrupt or foreign file leaves the session as it was.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..bridge import KV_TYPES, apply_plan_to_state, parse_state
from ..errors import KVMergeError, UnsupportedCacheError
from ..methods.base import plan_from_indices
from .compaction import CacheBook
from .saved import SavedCache, SavedCacheError, check_model, read_header, read_saved, write_saved

log = logging.getLogger(__name__)


class Persistence:
    """Mixin: ``save``, ``restore`` and the ``load`` constructor."""

    def model_sha256(self) -> str:
        from ..models import file_sha256  # noqa: PLC0415

        return file_sha256(self.model.path)

    def _doc_state(self):
        """A KVState with only the document's cells (the first ``doc_cells`` cells in blob order)."""
        st = self.bridge.read()
        n = self._doc_cells
        want = self.book.rope_pos.max(axis=(0, 1)) if n else np.zeros(0, np.int32)
        if st.n_cells < n or not np.array_equal(st.pos[:n], want):
            raise KVMergeError("the cache does not start with the document's cells; ingest again")
        if st.n_cells == n:
            return st
        g = self.model.geom
        idx = np.broadcast_to(np.arange(n, dtype=np.int32), (g.n_layer, g.n_kv_head, n))
        plan = plan_from_indices(idx, np.asarray(st.pos[:n]), st.n_cells)
        return apply_plan_to_state(st, plan)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the document cache to ``path`` (one file); returns the path."""
        self._check_open()
        if not self._doc_cells:
            raise KVMergeError("nothing to save: ingest a document first")
        self._close_active()
        st = self._doc_state()
        g = self.model.geom
        meta = {
            "model": {"sha256": self.model_sha256(), "name": self.model.info.get("name", ""),
                      "file": self.model.path.name, "path": str(self.model.path.resolve()), "label": self.model_label},
            "geometry": [g.n_layer, g.n_kv_head, g.head_dim],
            "method": self.method_name, "method_params": self.method_params, "budget": self.budget,
            "position_policy": self.position_policy, "chat_format": self.fmt.name,
            "n_ctx": self.ctx.n_ctx, "kv_type": self.ctx.kv_type, "flash_attn": bool(self.flash_attn),
            "document": {"name": self._doc_name, "sha256": self._doc_sha, "n_tokens": self._doc_tokens,
                         "pages": [list(p) for p in self._pages], "tail": self._doc_tail, "last_id": self._doc_last},
            "counters": {"t_prefill": self._t_prefill, "t_compact": self._t_compact,
                         "n_compactions": self._n_compactions, "n_reindex": self._n_reindex},
            "stats": self.stats.as_dict(),
        }
        blob = np.array(st.blob, copy=True)
        return write_saved(path, SavedCache(meta, blob, self.book.doc_pos, self.book.rope_pos, self.book.evidence))

    def restore(self, path: str | os.PathLike) -> None:
        """Replace this session's document with the saved cache at ``path`` (chat turns are dropped).

        Raises :class:`SavedCacheError` for a corrupt or foreign file, before anything changes.
        """
        self._check_open()
        p = Path(path)
        sc = read_saved(p)
        meta = sc.meta
        check_model(meta, self.model_sha256(), self.model_label, p.name)
        g = self.model.geom
        if list(meta.get("geometry", [])) != [g.n_layer, g.n_kv_head, g.head_dim]:
            raise SavedCacheError(f"{p.name}: cache geometry {meta.get('geometry')} does not match the model")
        try:
            st = parse_state(np.array(sc.blob, copy=True), g)
        except (UnsupportedCacheError, ValueError) as exc:
            raise SavedCacheError(f"{p.name} holds no valid cache state ({exc})") from exc
        want = (KV_TYPES[self.ctx.kv_type], KV_TYPES[self.ctx.type_v], not self.flash_attn)
        if (st.k_type, st.v_type, st.v_trans) != want:
            raise SavedCacheError(f"{p.name} was saved with kv_type={meta.get('kv_type')}, "
                                  f"flash_attn={meta.get('flash_attn')}; this session has kv_type={self.ctx.kv_type}, "
                                  f"flash_attn={self.flash_attn} (open it with Session.load to match)")
        if sc.doc_pos.shape != (g.n_layer, g.n_kv_head, st.n_cells):
            raise SavedCacheError(f"{p.name} is corrupt (positions do not match its {st.n_cells} cells)")
        if st.n_cells > self.ctx.n_ctx - self.reserve:
            raise SavedCacheError(f"{p.name} holds {st.n_cells} cells; this session (n_ctx {self.ctx.n_ctx}) has room "
                                  f"for {self.ctx.n_ctx - self.reserve}: open it with n_ctx >= "
                                  f"{st.n_cells + self.reserve}")
        doc = meta.get("document") or {}
        self._close_active()
        old = self.bridge.read() if self._cells_in_use() else None
        self.ctx.clear()
        try:
            self.bridge.write(st)
        except BaseException as exc:
            self.ctx.clear()
            if old is not None:
                self.bridge.write(old)
            raise SavedCacheError(f"llama.cpp refused the cache in {p.name}: {exc}") from exc
        self._init_doc()
        self._turns, self._pending, self._chat_tail, self._chat_last = [], [], "", None
        self.book = CacheBook(sc.doc_pos.copy(), sc.rope_pos.copy(), sc.evidence.copy())
        self._doc_cells = st.n_cells
        self._doc_tokens = int(doc.get("n_tokens", st.n_cells))
        self._doc_tail, self._doc_last = str(doc.get("tail", "")), doc.get("last_id")
        self._doc_name, self._doc_sha = str(doc.get("name", "")), str(doc.get("sha256", ""))
        self._pages = [tuple(int(x) for x in pg) for pg in doc.get("pages", [])]
        c = meta.get("counters") or {}
        self._t_prefill, self._t_compact = float(c.get("t_prefill", 0.0)), float(c.get("t_compact", 0.0))
        self._n_compactions, self._n_reindex = int(c.get("n_compactions", 0)), int(c.get("n_reindex", 0))
        log.info("restored %s: %d cells of %s", p.name, st.n_cells, self._doc_name)

    @classmethod
    def load(cls, path: str | os.PathLike, model: str | os.PathLike | None = None, **open_kwargs):
        """Open a session for the saved cache at ``path``: the model recorded in the file (unless given),
        with the file's n_ctx, cache type, flash attention, method and budget (``open_kwargs`` override)."""
        meta = read_header(path)
        kw = {"n_ctx": meta.get("n_ctx", 2048), "kv_type": meta.get("kv_type", "f16"),
              "flash_attn": meta.get("flash_attn", True), "method": meta.get("method", "kvmerger"),
              "budget": meta.get("budget", 0.5), "position_policy": meta.get("position_policy", "auto"),
              "method_params": meta.get("method_params") or None, "chat_format": meta.get("chat_format")}
        kw.update(open_kwargs)
        if model is None:
            rec = meta.get("model") or {}
            cand = rec.get("path")
            if cand and Path(cand).is_file():
                model = cand
            else:
                raise SavedCacheError(f"{Path(path).name} was made with {rec.get('file', '?')} "
                                      f"(sha256 {str(rec.get('sha256'))[:12]}...), which is not at {cand}; "
                                      "pass model=<path or models.txt name>")
        s = cls.open(model, **kw)
        try:
            s.restore(path)
        except BaseException:
            s.close()
            raise
        return s
