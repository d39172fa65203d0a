"""The one engine Session behind the app, shared by every browser tab and used by one request at a time.

Gradio's queue already runs engine events one at a time (``concurrency_id="engine"``); the lock here also
covers what the queue cannot: a streamed answer abandoned between two pieces (stop, closed tab, cancelled
event) is closed before anyone else touches the llama context.  Each tab has its own conversation id and
document; when another tab used the engine in between, the session is switched back to this tab's document
(from its saved cache) and its chat is restarted, carrying the tab's earlier turns as context.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kvmerge_local.errors import KVMergeError

from .choices import Settings
from .documents import check_upload
from .library import Library, SavedDoc
from .render import Coverage, coverage

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]
"""``(done_tokens, total_tokens, phase)``."""

ENGINE_DEFAULTS = ("n_gpu_layers", "n_threads", "flash_attn", "seed", "position_policy", "method_params")
"""``Session.open`` arguments set once for the whole app (from ``launch``), not per document."""

LOCK_WAIT_CLEANUP = 10.0
HISTORY_TURNS = 3
HISTORY_CHARS = 1500


class NoDocumentError(ValueError):
    """A question with no document to ask about (or a saved document that is gone)."""


@dataclass
class Snapshot:
    """What the gauge and plot show, taken under the lock after each engine operation."""

    stats: dict[str, Any] = field(default_factory=dict)
    pages: list[tuple[int, int, int]] = field(default_factory=list)
    coverage: Coverage | None = None
    doc: SavedDoc | None = None
    note: str = ""


class Workbench:
    """Owns the engine Session; all engine access goes through here.

    ``engine_factory``: the ``Session`` class or an object with the same ``open(model, **kw)`` and
    ``load(path, model=None, **kw)``; None imports :class:`kvmerge_local.Session` on first use.
    ``engine_kwargs``: ``Session.open`` keywords that hold for every document (:data:`ENGINE_DEFAULTS`).
    """

    def __init__(self, engine_factory: Any = None, *, library: Library | None = None,
                 engine_kwargs: dict | None = None, max_upload_mb: float = 50.0):
        self._factory = engine_factory
        self.library = library or Library()
        self.engine_kwargs = dict(engine_kwargs or {})
        self.max_upload_mb = max_upload_mb
        # Re-entrant: a dropped answer generator may be finalized by the garbage collector inside a locked
        # section of the same thread (its cleanup then finds nothing of its own to do).
        self._lock = threading.RLock()
        self._session = None
        self._doc: SavedDoc | None = None
        self._conversation: str | None = None
        self._stream: tuple[object, Iterator[str]] | None = None
        self._stops: dict[str, threading.Event] = {}
        self._snapshot = Snapshot()

    # ----------------------------------------------------------------------------------------------- public
    @property
    def factory(self):
        if self._factory is None:
            from kvmerge_local import Session

            self._factory = Session
        return self._factory

    @property
    def snapshot(self) -> Snapshot:
        """The latest snapshot (no engine access: safe while another request is running)."""
        return self._snapshot

    @property
    def current_doc(self) -> SavedDoc | None:
        return self._doc

    def ingest(self, path: str | Path, settings: Settings, *, name: str | None = None,
               progress: ProgressFn | None = None) -> tuple[SavedDoc, str]:
        """Validate, then ingest ``path`` with ``settings`` — or reload its saved cache when one exists.

        The file is read (and refused with the engine's DocumentError: empty, encrypted, scanned...) and the
        model looked up (ModelError) before the current document is let go.  Returns the document and a note
        for the user.  Raises UploadError for a refused upload and the engine's errors (KVMergeError,
        ValueError) for the rest.
        """
        from kvmerge_local.engine.documents import load_document
        from kvmerge_local.models import resolve_model

        path = Path(path)
        name = name or path.name
        check_upload(path, max_mb=self.max_upload_mb, display_name=name)
        document = load_document(path)
        resolve_model(settings.model)  # a missing model is reported before the current document is let go
        digest = document.sha256
        saved = self.library.find(digest, settings)
        stale = ""
        if saved is not None:
            try:
                doc, note = self.load(saved.key)
                return doc, f"{name} was ingested before with these settings: {note}"
            except KVMergeError as e:  # corrupt, or made with a model file that has changed since
                log.warning("saved cache of %s unusable, ingesting again: %s", name, e)
                stale = f" (its saved cache could not be used: {e})"
        with self._lock:
            self._end_stream()
            self._close_session()
            t0 = time.perf_counter()
            session = self.factory.open(settings.model, **settings.open_kwargs(), **self.engine_kwargs)
            self._session = session

            def report(p) -> None:
                if progress is not None:
                    progress(int(p.done_tokens), int(p.total_tokens), str(p.phase))

            try:
                stats = session.ingest(document, progress=report)
            except BaseException:
                self._close_session()  # a half-ingested document is of no use
                raise
            took = time.perf_counter() - t0
            stats_d = _stats_dict(stats)
            pages = [tuple(map(int, p)) for p in session.cache.pages]
            if progress is not None:
                progress(1, 1, "saving the compressed cache")
            try:
                doc = self.library.save(session, name=name, digest=digest, settings=settings, stats=stats_d)
                note = f"ingested {name} in {took:.1f} s; its compressed cache is saved for next time{stale}."
            except OSError as e:
                log.warning("could not save the cache of %s: %s", name, e)
                doc = SavedDoc(key=self.library.key_for(digest, settings), name=name, digest=digest,
                               settings=settings, created=time.time(), stats=stats_d, pages=pages)
                note = f"ingested {name} in {took:.1f} s, but its cache could not be saved ({e})."
            self._doc = doc
            self._conversation = None
            self._refresh(note)
            return doc, note

    def load(self, key: str) -> tuple[SavedDoc, str]:
        """Make the saved document ``key`` the engine's document (instant when it already is)."""
        with self._lock:
            self._end_stream()
            if self._session is not None and self._doc is not None and self._doc.key == key:
                self._conversation = None
                return self._doc, f"{self._doc.name} is loaded."
            doc = self._load_locked(key)
            return doc, self._snapshot.note

    def ask(self, question: str, *, conversation: str, doc_key: str | None = None,
            history: list[tuple[str, str]] | None = None, max_new_tokens: int = 256,
            temperature: float = 0.0) -> Iterator[str]:
        """Stream the answer to ``question`` in ``conversation`` (one per browser tab) about ``doc_key``.

        ``doc_key`` None means the engine's current document.  ``history``: the earlier (question, answer)
        turns of this conversation, used only when the session no longer holds them.  Stops early when
        :meth:`request_stop` is called for the conversation.
        """
        stop = self._stops[conversation] = threading.Event()
        token = object()
        try:
            with self._lock:
                self._end_stream()
                if self._doc is None and doc_key is None:
                    raise NoDocumentError("No document yet: drop a PDF, TXT or MD file, or load a saved one.")
                if doc_key is not None and (self._doc is None or self._doc.key != doc_key or self._session is None):
                    self._load_locked(doc_key)
                prompt = question
                if self._conversation != conversation:
                    self._session.reset_chat()
                    prompt = _with_history(question, history or [])
                    self._conversation = conversation
                it = iter(self._session.ask(prompt, max_new_tokens=max_new_tokens, temperature=temperature))
                self._stream = (token, it)
            while not stop.is_set():
                with self._lock:
                    if self._stream is None or self._stream[0] is not token:
                        return  # closed by another request after this one was abandoned
                    try:
                        piece = next(it)
                    except StopIteration:
                        break
                yield piece
        finally:
            if self._stops.get(conversation) is stop:
                del self._stops[conversation]
            # Bounded wait: never block a thread forever in cleanup; if the engine is busy, the next
            # operation closes this stream as an abandoned one.
            if self._lock.acquire(timeout=LOCK_WAIT_CLEANUP):
                try:
                    if self._stream is not None and self._stream[0] is token:
                        self._end_stream()
                        self._refresh("")
                finally:
                    self._lock.release()

    def request_stop(self, conversation: str) -> bool:
        """Ask the running answer of ``conversation`` to stop after its current piece (False: none runs)."""
        stop = self._stops.get(conversation)
        if stop is not None:
            stop.set()
        return stop is not None

    def forget(self, key: str) -> bool:
        """Delete a saved cache (the engine keeps its current document even if it is this one)."""
        return self.library.remove(key)

    def close(self) -> None:
        """End any stream and free the engine."""
        with self._lock:
            self._end_stream()
            self._close_session()
            self._doc = None
            self._snapshot = Snapshot()

    # ---------------------------------------------------------------------------------------------- private
    def _load_locked(self, key: str) -> SavedDoc:
        saved = self.library.get(key)
        if saved is None:
            raise NoDocumentError("That saved document is no longer on disk; upload it again.")
        self._close_session()
        t0 = time.perf_counter()
        self._session = self.factory.load(saved.cache_path, model=saved.settings.model,
                                          **saved.settings.open_kwargs(), **self.engine_kwargs)
        took = time.perf_counter() - t0
        self._doc = saved
        self._conversation = None
        self._refresh(f"loaded {saved.name} from its saved cache in {took * 1000:.0f} ms.")
        return saved

    def _end_stream(self) -> None:
        """Close an unfinished answer stream (the engine's iterator cleans up the chat state)."""
        if self._stream is not None:
            _, it = self._stream
            self._stream = None
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # the answer is being discarded; the next operation reports real errors
                    log.exception("closing an abandoned answer stream failed")

    def _close_session(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            self._doc = None
            self._conversation = None
            self._snapshot = Snapshot()
            session.close()

    def _refresh(self, note: str) -> None:
        s = self._session
        if s is None:
            self._snapshot = Snapshot(note=note)
            return
        live = _stats_dict(s.stats)
        doc = self._doc
        if doc is not None:
            for k, v in doc.stats.items():  # a reloaded cache keeps the times of its original ingestion
                if not live.get(k) and v:
                    live[k] = v
            live.setdefault("kv_type", doc.settings.kv_type)
        cache = s.cache  # the document cache: its cells' document positions, pages and token count
        pages = [tuple(map(int, p)) for p in cache.pages]
        cov = coverage(cache.doc_pos, cache.n_tokens, pages)
        self._snapshot = Snapshot(stats=live, pages=pages, coverage=cov, doc=doc,
                                  note=note or self._snapshot.note)


def _stats_dict(stats) -> dict[str, Any]:
    d = stats.as_dict() if hasattr(stats, "as_dict") else dict(stats)
    return dict(d)


def _with_history(question: str, history: list[tuple[str, str]]) -> str:
    """The question prefixed with this conversation's last turns (when the session lost them)."""
    turns = [(q, a) for q, a in history if q and a][-HISTORY_TURNS:]
    if not turns:
        return question
    lines = []
    for q, a in turns:
        lines.append(f"Q: {q.strip()}\nA: {a.strip()}")
    context = "\n".join(lines)
    if len(context) > HISTORY_CHARS:
        context = "…" + context[-HISTORY_CHARS:]
    return f"Earlier in this conversation:\n{context}\n\nNow: {question}"
