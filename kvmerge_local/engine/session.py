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

from ..bridge import KV_TYPES, KVBridge, LlamaContext, LlamaModel
from ..bridge.state import row_bytes
from ..errors import KVMergeError
from ..methods import DEFAULT_METHOD, Full, Method, get_method, resolve_budget
from .chat import FORMAT_NAMES, detect_format
from .compaction import CacheBook, compact
from .conversation import TAIL_CHARS, Conversation
from .documents import load_document, page_token_spans
from .persist import Persistence
from .positions import RopeParams
from .replay import FIRST_PROMPT, LATER_PROMPT, replay_scores
from .stats import IngestProgress, Stats

log = logging.getLogger(__name__)

POSITION_POLICIES = ("auto", "keep", "reindex")


def _reserve(n_ctx: int) -> int:
    return max(16, min(512, n_ctx // 4))


class Session(Conversation, Persistence):
    """See the module docstring.  Create with :meth:`open` (or :meth:`load`)."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, *, method: Method, method_name: str, budget,
                 position_policy: str, seed: int, method_params: dict, chat_format: str | None,
                 model_label: str, flash_attn: bool) -> None:
        self.model, self.ctx = model, ctx
        self.bridge = KVBridge(ctx)
        self.method, self.method_name, self.budget = method, method_name, budget
        self.method_params = dict(method_params)
        self.position_policy, self.seed = position_policy, int(seed)
        self.fmt = detect_format(model, chat_format)
        self.model_label, self.flash_attn = model_label, flash_attn
        self.reserve = _reserve(ctx.n_ctx)
        self._rng = np.random.default_rng(self.seed)
        self._rope: RopeParams | None = None
        g = model.geom
        self.bytes_per_cell = g.n_layer * (row_bytes(KV_TYPES[ctx.kv_type], g.n_embd_kv)
                                           + row_bytes(KV_TYPES[ctx.type_v], g.n_embd_kv))
        self._closed = False
        self._init_doc()
        self._init_chat()

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, model: str | os.PathLike | None = None, *, n_ctx: int = 2048, n_gpu_layers: int = 0,
             kv_type: str = "f16", flash_attn: bool = True, n_threads: int | None = None,
             method: str | Method = DEFAULT_METHOD, budget: float | int = 0.5, position_policy: str = "auto",
             seed: int = 0, method_params: dict | None = None, chat_format: str | None = None) -> Session:
        """Open ``model`` (a GGUF path, a ``models.txt`` name, or None for the embedded default).

        ``budget``: fraction in (0, 1] of the document's tokens to keep, or an int cell count;
        ``method``: a name from ``kvmerge-local methods`` (``method_params`` override its parameters);
        ``chat_format``: "gguf" (the model's own chat template), "llama2", "mistral" or "raw" (default: the
        template when the GGUF has one, else detected from the model's name).
        """
        from ..models import resolve_model  # noqa: PLC0415

        if position_policy not in POSITION_POLICIES:
            raise ValueError(f"position_policy must be one of {POSITION_POLICIES}, got {position_policy!r}")
        resolve_budget(budget, 1 << 20)  # validates type and range
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
            ctx = LlamaContext(lm, n_ctx=n_ctx, n_threads=n_threads, flash_attn=flash_attn, kv_type=kv_type)
            s = cls(lm, ctx, method=meth, method_name=name, budget=budget, position_policy=position_policy,
                    seed=seed, method_params=params, chat_format=chat_format,
                    model_label=entry.name if entry else path.name, flash_attn=flash_attn)
        except BaseException:
            if ctx is not None:
                ctx.close()
            lm.close()
            raise
        log.info("session: %s, n_ctx %d, %s cache, method %s, budget %s, format %s", path.name, ctx.n_ctx, kv_type,
                 name, budget, s.fmt.name)
        return s

    def _init_doc(self) -> None:
        g = self.model.geom
        self.book = CacheBook.empty(g.n_layer, g.n_kv_head)
        self._doc_cells = 0
        self._doc_tokens = 0
        self._doc_ids, self._replayed = np.zeros(0, np.int32), 0
        self._doc_tail, self._doc_last = "", None
        self._doc_name, self._doc_sha = "", ""
        self._pages: list[tuple[int, int, int]] = []
        self._t_prefill = self._t_compact = self._t_decode = 0.0
        self._n_compactions = self._n_reindex = self._tokens_generated = 0

    # --- properties ------------------------------------------------------------------------------------
    @property
    def rope(self) -> RopeParams:
        if self._rope is None:
            self._rope = RopeParams.from_model(self.model)
        return self._rope

    @property
    def n_ctx_train(self) -> int:
        return int(self.model.info["n_ctx_train"]) or self.ctx.n_ctx

    @property
    def pages(self) -> list[tuple[int, int, int]]:
        """(page_number, first_token, last_token) of the ingested document (empty for plain text)."""
        return list(self._pages)

    @property
    def stats(self) -> Stats:
        cells = self._cells_in_use() if not self._closed else 0
        chat = max(0, cells - self._doc_cells)
        full = self.bytes_per_cell * (self._doc_tokens + chat)
        now = self.bytes_per_cell * cells
        return Stats(tokens_ingested=self._doc_tokens, cells_in_use=cells, n_ctx=self.ctx.n_ctx,
                     kv_bytes_full=full, kv_bytes_now=now, ratio=(now / full) if full else 1.0,
                     t_prefill=self._t_prefill, t_compact=self._t_compact, t_decode=self._t_decode,
                     method=self.method_name, budget=self.budget, n_compactions=self._n_compactions,
                     n_reindex=self._n_reindex, doc_cells=self._doc_cells, chat_cells=chat,
                     tokens_generated=self._tokens_generated, position_policy=self.position_policy,
                     kv_type=self.ctx.kv_type, n_ctx_train=self.n_ctx_train, bytes_per_cell=self.bytes_per_cell,
                     model=self.model_label, document=self._doc_name)

    def kept_positions(self) -> np.ndarray:
        """int32[n_layer, n_kv_head, cells]: the document token each cell holds (pivot for merged cells)."""
        return self.book.doc_pos.copy()

    # --- ingest ----------------------------------------------------------------------------------------
    def _evidence_window(self) -> int | None:
        kind = self.method.evidence_kind
        return {"none": None, "window": int(self.method.window), "all": 0, "last": 1}.get(kind)

    def _target(self, tokens: int, cap: int) -> int:
        m = resolve_budget(self.budget, max(1, tokens))
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
        self._close_active()
        self._reset_cache()
        self._doc_ids, self._replayed = np.asarray(toks, np.int32), 0
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
        self._doc_cells = self.book.n
        self._doc_tokens = n
        text = head + doc.text
        self._doc_tail, self._doc_last = text[-TAIL_CHARS:], int(toks[-1])
        self._doc_name, self._doc_sha = doc.name, doc.sha256
        self._pages = page_token_spans(self.model, body, len(head.encode("utf-8")), doc.text, doc.pages,
                                       first_token=n_bos)
        st = self.stats
        log.info("ingested %s: %s", doc.name, st.summary())
        return st

    def _prefill(self, toks: np.ndarray, cap: int, progress) -> None:
        n = len(toks)
        chunk = max(1, min(self.ctx.n_batch, cap // 2))
        t_start = time.perf_counter()
        ev_on = self._evidence_window() is not None

        def report(done: int, phase: str) -> None:
            if progress is not None:
                progress(IngestProgress(done, n, phase, self.book.n, self._n_compactions,
                                        time.perf_counter() - t_start))

        i = 0
        while i < n:
            part = toks[i:i + chunk]
            if self.book.n + len(part) > cap:
                self._compact_to(self._target(i, cap - len(part)), len(part), ev_on)
                report(i, "compact")
            t0 = time.perf_counter()
            p0 = self.ctx.n_past
            if ev_on and self.method.evidence_kind == "window":
                self.bridge.reset_evidence()  # the observation window is the last queries before a compaction
            self.ctx.decode(part, logits="none")
            self._t_prefill += time.perf_counter() - t0
            self.book.append(np.arange(i, i + len(part)), np.arange(p0, p0 + len(part)))
            i += len(part)
            report(i, "prefill")
        final = self._target(n, cap)
        if self.book.n > final:
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
            if self._replayed <= int(self.book.doc_pos.max()):  # tokens not replayed yet
                self.book.evidence = np.maximum(self.book.evidence, self._replay_scores())
        self.book, res = compact(self.bridge, self.method, self.book, m, reindex=reindex,
                                 rope=self.rope if reindex else None, evidence_on=ev_on)
        self._t_compact += res.seconds
        self._n_compactions += 1
        self._n_reindex += int(res.reindexed)

    def _replay_scores(self) -> np.ndarray:
        """float32[L, H, N]: KVzip scores of the cells now cached, from replaying the document tokens not
        replayed yet (each token is replayed once; earlier cells keep the larger of old and new scores)."""
        hi = int(self.book.doc_pos.max()) + 1
        toks = self._doc_ids[self._replayed:hi]
        t0 = time.perf_counter()
        first, later = (self._replay_prompt(p) for p in (FIRST_PROMPT, LATER_PROMPT))
        scores = replay_scores(self.bridge, toks, first, later, chunk_size=int(getattr(self.method, "chunk_size", 512)),
                               step=int(getattr(self.method, "step", 16)))
        self._replayed = hi
        self._t_compact += time.perf_counter() - t0
        return scores

    def _replay_prompt(self, instruction: str) -> np.ndarray:
        """int32[n]: ``instruction`` laid out as the chat format lays out a first question after the
        document (KVzip replays the document as the answer to it)."""
        from .templates import Q1, TemplateFormat  # noqa: PLC0415

        fmt = self.fmt
        text = fmt.first.replace(Q1, instruction) if isinstance(fmt, TemplateFormat) else fmt.first.format(q=instruction)
        return self.model.tokenize(text, add_bos=False, special=bool(getattr(fmt, "special", False)))

    def _reset_cache(self) -> None:
        self.ctx.clear()
        self._init_doc()
        self._turns, self._pending, self._chat_tail, self._chat_last = [], [], "", None

    # --- lifecycle -------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise KVMergeError("this session is closed")

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if self._closed:
            return
        try:
            self._close_active()
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
                f"budget={self.budget}, doc_cells={self._doc_cells})")


__all__ = ["Session", "POSITION_POLICIES"]
