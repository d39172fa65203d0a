"""A long-document chat session: one model, one llama.cpp context, one (compressed) document.

    s = Session.open("model.gguf", n_ctx=2048, method="kvmerger", budget=0.5)
    s.ingest(Path("report.pdf"))                  # chunked prefill, compress-as-you-go
    for piece in s.ask("What does page 3 say?"):  # streams the answer
        print(piece, end="")
    print(s.stats.summary()); s.save("report.kvm")

Ingest: the document (after BOS and the chat format's head) is prefilled in chunks of at most
``(n_ctx - reserve) / 2`` tokens, one ``llama_decode`` each (so the evidence window lands in every chunk).
When the next chunk would not fit in ``n_ctx - reserve`` cells (``reserve`` = room for a question and an
answer: ``n_ctx / 4`` clamped to [16, 512]), the cache is compacted to ``min(budget of the tokens so far,
room left for the chunk)``; at the end to the budget of the whole document.  Positions: ``keep`` leaves the
original (pivot) positions, ``reindex`` renumbers the cells 0..m-1 at every compaction (keys re-rotated per
head), ``auto`` re-indexes at a compaction when the next chunk (and the reserve) would otherwise pass the
model's trained context.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from pathlib import Path

from ..bridge import KVBridge, LlamaContext, LlamaModel
from ..budget import Budget
from ..errors import KVMergeError
from ..memory import KVStorage, MemoryPlan
from ..methods import DEFAULT_METHOD, Full, Method, get_method
from .cache import TAIL_CHARS, DocumentCache
from .chat import FORMAT_NAMES, detect_format
from .conversation import Chat
from .documents import load_document, page_token_spans
from .replay import FIRST_PROMPT, LATER_PROMPT, replay_prompt, replay_scores
from .saved import SavedCacheError
from .sizing import plan_memory
from .stats import IngestProgress, Stats

log = logging.getLogger(__name__)

POSITION_POLICIES = ("auto", "keep", "reindex")


def _reserve(n_ctx: int) -> int:
    return max(16, min(512, n_ctx // 4))


class Session:
    """See the module docstring.  Create with :meth:`open` (or :meth:`load`).

    ``cache`` (:class:`~.cache.DocumentCache`) is the compressed document: its cells' positions and evidence,
    its metadata, its size (``cache.nbytes``); ``chat`` (:class:`~.conversation.Chat`) holds the turns that follow
    it (``ask``, ``peek_logits`` and ``reset_chat`` delegate to it)."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, *, method: Method, method_name: str, budget: Budget,
                 position_policy: str, seed: int, method_params: dict, chat_format: str | None,
                 model_label: str, flash_attn: bool) -> None:
        self.model, self.ctx = model, ctx
        self.bridge = KVBridge(ctx)
        self.method, self.method_name, self.budget = method, method_name, Budget.parse(budget)
        self.method_params = dict(method_params)
        self.position_policy, self.seed = position_policy, int(seed)
        self.fmt = detect_format(model, chat_format)
        self.model_label, self.flash_attn = model_label, flash_attn
        self.reserve = _reserve(ctx.n_ctx)
        self._rng = np.random.default_rng(self.seed)
        self._closed = False
        self._init_doc()

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, model: str | os.PathLike | None = None, *, n_ctx: int = 2048, n_gpu_layers: int = 0,
             kv_type: str = "f16", flash_attn: bool = True, n_threads: int | None = None,
             method: str | Method = DEFAULT_METHOD, budget: Budget | float | int | str = 0.5, position_policy: str = "auto",
             seed: int = 0, method_params: dict | None = None, chat_format: str | None = None,
             memory: float | None = None) -> Session:
        """Open ``model`` (a GGUF path, a ``models.txt`` name, or None for the embedded default).

        ``budget``: fraction in (0, 1] of the document's tokens to keep, or an int cell count (see
        :class:`~kvmerge_local.budget.Budget`); ``kv_type``: the cache's element types ("q8_0", or K/V such as
        "q8_0/q4_0"); ``memory``: instead of both, a fraction in (0, 1] of the bytes an f16 cache of the whole
        document takes, met by quantizing first and evicting the rest (:class:`~kvmerge_local.memory.MemoryPlan`);
        ``method``: a name from ``kvmerge-local methods`` (``method_params`` override its parameters);
        ``chat_format``: "gguf" (the model's own chat template), "llama2", "mistral" or "raw" (default: the
        template when the GGUF has one, else detected from the model's name).
        """
        from ..models import resolve_model  # noqa: PLC0415

        if position_policy not in POSITION_POLICIES:
            raise ValueError(f"position_policy must be one of {POSITION_POLICIES}, got {position_policy!r}")
        budget, storage = Budget.parse(budget), KVStorage.parse(kv_type)
        if memory is not None:
            MemoryPlan.for_fraction(memory)  # a bad fraction fails before the model loads
        params = dict(method_params or {})
        if isinstance(method, Method):
            meth, name = method, getattr(method, "name", type(method).__name__)
        else:
            meth, name = get_method(str(method), **params), str(method)
        if chat_format is not None and chat_format not in FORMAT_NAMES:
            raise ValueError(f"unknown chat format {chat_format!r}; known: {', '.join(FORMAT_NAMES)}")
        if not isinstance(n_ctx, int) or n_ctx < 64:
            raise ValueError(f"n_ctx must be an int >= 64, got {n_ctx!r}")
        path, entry = resolve_model(model)
        if chat_format is None and entry is not None and entry.value(entry.chat_format) in ("llama2", "mistral", "raw"):
            chat_format = entry.value(entry.chat_format)
        lm = LlamaModel(path, n_gpu_layers=n_gpu_layers)
        ctx = None
        try:
            if memory is not None:
                plan = plan_memory(memory, lm.geom.head_dim, flash_attn)
                budget, storage = plan.budget, plan.storage
            ctx = LlamaContext(lm, n_ctx=n_ctx, n_threads=n_threads, flash_attn=flash_attn, kv_type=storage.type_k,
                               type_v=storage.type_v)
            s = cls(lm, ctx, method=meth, method_name=name, budget=budget, position_policy=position_policy,
                    seed=seed, method_params=params, chat_format=chat_format,
                    model_label=entry.name if entry else path.name, flash_attn=flash_attn)
        except BaseException:
            if ctx is not None:
                ctx.close()
            lm.close()
            raise
        log.info("session: %s, n_ctx %d, %s cache, method %s, budget %s, format %s", path.name, ctx.n_ctx, storage,
                 name, budget, s.fmt.name)
        return s

    def _init_doc(self, cache: DocumentCache | None = None) -> None:
        """A new document: ``cache`` (default: an empty one for this context) and a new chat after it."""
        self.cache = cache if cache is not None else DocumentCache.for_context(self.ctx)
        self.chat = Chat(self.model, self.ctx, self.bridge, self.fmt, self.cache, self._rng)

    # --- properties ------------------------------------------------------------------------------------
    @property
    def bytes_per_cell(self) -> int:
        return self.cache.bytes_per_cell

    @property
    def n_ctx_train(self) -> int:
        return int(self.model.info["n_ctx_train"]) or self.ctx.n_ctx

    @property
    def pages(self) -> list[tuple[int, int, int]]:
        """(page_number, first_token, last_token) of the ingested document (empty for plain text)."""
        return list(self.cache.pages)

    @property
    def stats(self) -> Stats:
        c = self.cache
        cells = self.bridge.n_cells() if not self._closed else 0
        chat = max(0, cells - c.n_cells)
        full = c.bytes_per_cell * (c.n_tokens + chat)
        now = c.bytes_per_cell * cells
        f16 = self.model.geom.bytes_per_cell(1, 1) * (c.n_tokens + chat)  # ggml type 1: f16
        return Stats(tokens_ingested=c.n_tokens, cells_in_use=cells, n_ctx=self.ctx.n_ctx,
                     kv_bytes_full=full, kv_bytes_f16=f16, kv_bytes_now=now, ratio=(now / full) if full else 1.0,
                     t_prefill=c.t_prefill, t_compact=c.t_compact, t_decode=self.chat.t_decode,
                     method=self.method_name, budget=self.budget.value, n_compactions=c.n_compactions,
                     n_reindex=c.n_reindex, doc_cells=c.n_cells, chat_cells=chat,
                     tokens_generated=self.chat.tokens_generated, position_policy=self.position_policy,
                     kv_type=self.ctx.kv_name, n_ctx_train=self.n_ctx_train, bytes_per_cell=c.bytes_per_cell,
                     model=self.model_label, document=c.name)

    def kept_positions(self) -> np.ndarray:
        """int32[n_layer, n_kv_head, cells]: the document token each cell holds (pivot for merged cells)."""
        return self.cache.doc_pos.copy()

    # --- ingest ----------------------------------------------------------------------------------------
    def _evidence_window(self) -> int | None:
        kind = self.method.evidence_kind
        return {"none": None, "window": int(self.method.window), "all": 0, "last": 1}.get(kind)

    def _target(self, tokens: int, cap: int) -> int:
        m = self.budget.cells(max(1, tokens))
        return max(1, min(m, cap))

    def ingest(self, document, *, progress=None) -> Stats:
        """Prefill ``document`` (``str`` text, or a path to .txt/.md/.pdf), compressing as it goes.

        Replaces any earlier document and chat.  ``progress(IngestProgress)`` is called after every chunk
        and compaction.  On a bad document nothing changes; if ingestion fails midway the session is left
        empty (and usable).
        """
        self._check_open()
        doc = load_document(document)
        head = self.fmt.doc_head
        sp = self.fmt.special  # template formats: special-token text is parsed; BOS unless the template renders it
        body = self.model.tokenize(head + doc.text, add_bos=False, special=sp)
        toks = self.model.tokenize(head + doc.text, add_bos=self.fmt.add_bos, special=sp)
        n_bos = len(toks) - len(body)
        n = len(toks)
        cap = self.ctx.n_ctx - self.reserve
        if cap < 2:
            raise ValueError(f"n_ctx {self.ctx.n_ctx} leaves no room for a document")
        if n > cap and isinstance(self.method, Full):
            raise ValueError(f"method 'full' keeps every token: this document needs {n} cells but only {cap} "
                             f"fit (n_ctx {self.ctx.n_ctx} minus {self.reserve} for the question and answer); "
                             "pick a compressing method or a larger n_ctx")
        self.chat.close_active()
        self._reset_cache()
        self.cache.tokens = np.asarray(toks, np.int32)
        win = self._evidence_window()
        try:
            if win is not None:
                self.bridge.enable_evidence(win)
                self.bridge.reset_evidence()
            self._prefill(toks, cap, progress)
        except BaseException:
            log.warning("ingest failed; the session is empty again")
            self._reset_cache()
            raise
        finally:
            if win is not None and not self._closed:
                self.bridge.disable_evidence()
        c = self.cache
        text = head + doc.text
        c.tail, c.last_id = text[-TAIL_CHARS:], int(toks[-1])
        c.name, c.sha256 = doc.name, doc.sha256
        c.pages = page_token_spans(self.model, body, len(head.encode("utf-8")), doc.text, doc.pages, first_token=n_bos)
        log.info("ingested %s: %s", doc.name, (st := self.stats).summary())
        return st

    def _prefill(self, toks: np.ndarray, cap: int, progress) -> None:
        n = len(toks)
        chunk = max(1, min(self.ctx.n_batch, cap // 2))
        t_start = time.perf_counter()
        ev_on = self._evidence_window() is not None

        def report(done: int, phase: str) -> None:
            if progress is not None:
                progress(IngestProgress(done, n, phase, self.cache.n_cells, self.cache.n_compactions,
                                        time.perf_counter() - t_start))

        i = 0
        while i < n:
            part = toks[i:i + chunk]
            if self.cache.n_cells + len(part) > cap:
                self._compact_to(self._target(i, cap - len(part)), len(part), ev_on)
                report(i, "compact")
            t0 = time.perf_counter()
            p0 = self.ctx.n_past
            if ev_on and self.method.evidence_kind == "window":
                self.bridge.reset_evidence()  # the observation window is the last queries before a compaction
            self.ctx.decode(part, logits="none")
            self.cache.t_prefill += time.perf_counter() - t0
            self.cache.append(np.arange(i, i + len(part)), np.arange(p0, p0 + len(part)))
            i += len(part)
            self.cache.n_tokens = i
            report(i, "prefill")
        final = self._target(n, cap)
        if self.cache.n_cells > final:
            self._compact_to(final, 0, ev_on)
            report(n, "compact")
        if self.ctx.n_past + self.reserve > self.n_ctx_train:
            log.warning("positions reach %d, past the model's trained context %d (position_policy=%s)",
                        self.ctx.n_past, self.n_ctx_train, self.position_policy)

    def _compact_to(self, m: int, upcoming: int, ev_on: bool) -> None:
        """Compact to ``m`` cells; ``auto`` re-indexes only when the ``upcoming`` tokens (the next chunk, or
        nothing at the end) plus the question/answer reserve would pass the trained context -- as late as
        possible, so recent text keeps its true distances to the question."""
        if self.position_policy == "reindex":
            reindex = True
        elif self.position_policy == "keep":
            reindex = False
        else:
            reindex = self.ctx.n_past + upcoming + self.reserve > self.n_ctx_train
        if self.method.evidence_kind == "reconstruct":
            ev_on = False
            if self.cache.replayed <= int(self.cache.doc_pos.max()):  # tokens not replayed yet
                self.cache.evidence = np.maximum(self.cache.evidence, self._replay_scores())
        self.cache.compact(self.bridge, self.method, m, reindex=reindex, evidence_on=ev_on)

    def _replay_scores(self) -> np.ndarray:
        """float32[L, H, N]: KVzip scores of the cells now cached, from replaying the document tokens not
        replayed yet (each token is replayed once; earlier cells keep the larger of old and new scores)."""
        c = self.cache
        hi = int(c.doc_pos.max()) + 1
        toks = c.tokens[c.replayed:hi]
        t0 = time.perf_counter()
        first, later = (replay_prompt(self.model, self.fmt, p) for p in (FIRST_PROMPT, LATER_PROMPT))
        scores = replay_scores(self.bridge, toks, first, later, chunk_size=int(getattr(self.method, "chunk_size", 512)),
                               step=int(getattr(self.method, "step", 16)))
        c.replayed = hi
        c.t_compact += time.perf_counter() - t0
        return scores

    # --- chat (delegated to self.chat) -----------------------------------------------------------------
    def ask(self, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0, raw: bool = False,
            answer_prefix: str = ""):
        """Stream the answer to ``question`` (an iterator of str pieces); see :meth:`.Chat.ask`."""
        self._check_open()
        return self.chat.ask(question, max_new_tokens=max_new_tokens, temperature=temperature, raw=raw,
                             answer_prefix=answer_prefix)

    def peek_logits(self, question: str, *, raw: bool = False) -> np.ndarray:
        """float32[n_vocab]: next-token logits after ``question``, cache unchanged (:meth:`.Chat.peek_logits`)."""
        self._check_open()
        return self.chat.peek_logits(question, raw=raw)

    def reset_chat(self) -> None:
        """Forget every chat turn; the document cache stays."""
        self._check_open()
        self.chat.reset()

    # --- save and load --------------------------------------------------------------------------------
    def model_sha256(self) -> str:
        from ..models import file_sha256  # noqa: PLC0415

        return file_sha256(self.model.path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the document cache (its cells only: chat turns are not saved) to ``path``; returns the path."""
        self._check_open()
        c = self.cache
        if not c.n_cells:
            raise KVMergeError("nothing to save: ingest a document first")
        self.chat.close_active()
        st = self.bridge.read_prefix(c.n_cells)
        if not np.array_equal(st.pos, c.rope_pos.max(axis=(0, 1))):
            raise KVMergeError("the cache does not start with the document's cells; ingest again")
        g = self.model.geom
        meta = {
            "model": {"sha256": self.model_sha256(), "name": self.model.info.get("name", ""),
                      "file": self.model.path.name, "path": str(self.model.path.resolve()), "label": self.model_label},
            "geometry": [g.n_layer, g.n_kv_head, g.head_dim],
            "method": self.method_name, "method_params": self.method_params, "budget": self.budget.value,
            "position_policy": self.position_policy, "chat_format": self.fmt.name,
            "n_ctx": self.ctx.n_ctx, "kv_type": self.ctx.kv_name, "flash_attn": bool(self.flash_attn),
            "stats": self.stats.as_dict(),
        }
        return c.save(path, st, meta)

    def restore(self, path: str | os.PathLike) -> None:
        """Replace this session's document with the saved cache at ``path`` (chat turns are dropped).

        Raises :class:`SavedCacheError` for a corrupt or foreign file, before anything changes.
        """
        self._check_open()
        p = Path(path)
        cache, st, meta = DocumentCache.load(p, self.model.geom, model_sha256=self.model_sha256(),
                                             model_label=self.model_label)
        if (cache.k_type, cache.v_type, st.v_trans) != (self.cache.k_type, self.cache.v_type, not self.flash_attn):
            raise SavedCacheError(f"{p.name} was saved with kv_type={meta.get('kv_type')}, "
                                  f"flash_attn={meta.get('flash_attn')}; this session has kv_type={self.ctx.kv_name}, "
                                  f"flash_attn={self.flash_attn} (open it with Session.load to match)")
        if st.n_cells > self.ctx.n_ctx - self.reserve:
            raise SavedCacheError(f"{p.name} holds {st.n_cells} cells; this session (n_ctx {self.ctx.n_ctx}) has room "
                                  f"for {self.ctx.n_ctx - self.reserve}: open it with n_ctx >= "
                                  f"{st.n_cells + self.reserve}")
        self.chat.close_active()
        old = self.bridge.read() if self.bridge.n_cells() else None
        self.ctx.clear()
        try:
            self.bridge.write(st)
        except BaseException as exc:
            self.ctx.clear()
            if old is not None:
                self.bridge.write(old)
            raise SavedCacheError(f"llama.cpp refused the cache in {p.name}: {exc}") from exc
        self._init_doc(cache)
        log.info("restored %s: %d cells of %s", p.name, st.n_cells, cache.name)

    @classmethod
    def load(cls, path: str | os.PathLike, model: str | os.PathLike | None = None, **open_kwargs) -> Session:
        """Open a session for the saved cache at ``path``: the model recorded in the file (unless given),
        with the file's n_ctx, cache type, flash attention, method and budget (``open_kwargs`` override)."""
        info = DocumentCache.read_meta(path)
        kw = {**info.open_kwargs(), **open_kwargs}
        if model is None:
            model = info.model_path(Path(path).name)
        s = cls.open(model, **kw)
        try:
            s.restore(path)
        except BaseException:
            s.close()
            raise
        return s

    def _reset_cache(self) -> None:
        self.ctx.clear()
        self._init_doc()

    # --- lifecycle -------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise KVMergeError("this session is closed")

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if self._closed:
            return
        try:
            self.chat.close_active()
        finally:
            self._closed = True
            self.ctx.close()
            self.model.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Session({self.model_label}, n_ctx={self.ctx.n_ctx}, method={self.method_name}, "
                f"budget={self.budget}, doc_cells={self.cache.n_cells})")


__all__ = ["Session", "POSITION_POLICIES"]
