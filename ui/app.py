"""The Gradio app: drop a document, pick a model and a compression method, chat, and watch the cache.

``build_app(engine_factory)`` builds the Blocks (nothing happens at import); ``launch(...)`` serves it on
loopback (``kvmerge-local ui``).  Every handler that touches the engine runs in one Gradio concurrency group
(``concurrency_id="engine"``, limit 1), so a second tab waits instead of sharing the llama context.
"""
from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from kvmerge_local.errors import KVMergeError

from .choices import (N_CTX_CHOICES, Settings, default_model_choice, document_model_missing, kv_type_choices,
                      method_choices, model_choices)
from .documents import DEFAULT_MAX_MB, UploadError, suffixes
from .library import Library
from .render import CSS, citations_markdown, cited_pages, gauge_html, plot_html
from .workbench import ENGINE_DEFAULTS, Workbench

log = logging.getLogger(__name__)

ENGINE = dict(concurrency_limit=1, concurrency_id="engine")
"""Event options for every handler that touches the llama context."""

STREAM_EVERY = 0.05
"""Seconds between two chat updates while an answer streams."""

PHASES = {"prefill": "Reading the document into the cache", "compact": "Merging the cache"}

INTRO = ("### kvmerge-local — chat with a long document\n"
         "Drop a PDF, TXT or MD file; it is read into a local llama.cpp model whose KV cache is compressed by "
         "merging similar tokens. The gauge shows what that saved; the plot shows where in the document the "
         "cache still holds evidence.")


USER_ERRORS = (UploadError, KVMergeError, ValueError, FileNotFoundError)
"""Errors shown to the person as they are (the engine's messages say what to do)."""


def _new_client(doc: str | None = None) -> dict[str, Any]:
    """Per-tab state: its conversation id, its document key and its turns."""
    return {"conv": uuid.uuid4().hex, "doc": doc, "turns": []}


def _messages(turns: list[dict]) -> list[dict]:
    """Chatbot messages (Gradio's messages format) for the turns of one conversation."""
    out: list[dict] = []
    for t in turns:
        out.append({"role": "user", "content": t["q"]})
        out.append({"role": "assistant", "content": t["a"] or "…"})
        if t.get("cite"):
            out.append({"role": "assistant", "content": t["cite"],
                        "metadata": {"title": "Pages cited: " + ", ".join(map(str, t["cited"]))}})
    return out


def build_app(engine_factory: Any = None, *, default_model: str | None = None, library: Library | None = None,
              max_upload_mb: float = DEFAULT_MAX_MB, defaults: dict | None = None,
              engine_kwargs: dict | None = None, max_new_tokens: int = 256) -> gr.Blocks:
    """Build the app around one engine.

    ``engine_factory``: the ``Session`` class, or an object with the same ``open(model, **kw)`` and
    ``load(path, model=None, **kw)``; None uses :class:`kvmerge_local.Session`.  ``default_model`` preselects
    a model (path or models.txt name; default: the document model SmolLM2-135M-Instruct that ``make setup``
    pulls).  ``library``: where saved caches live (default ``$KVMERGE_DOCS`` or
    ``~/.cache/kvmerge-local/docs``).  ``defaults``: initial picker values (method, budget, kv_type, n_ctx).
    ``engine_kwargs``: ``Session.open`` keywords for every document (n_gpu_layers, n_threads, flash_attn...).
    ``max_new_tokens``: the longest answer.  The workbench that owns the engine is ``app.workbench``
    (``app.workbench.close()`` frees it).
    """
    wb = Workbench(engine_factory, library=library, engine_kwargs=engine_kwargs, max_upload_mb=max_upload_mb)
    base = Settings(**{k: v for k, v in (defaults or {}).items() if k in ("method", "budget", "kv_type", "n_ctx")})
    models = model_choices(default_model)
    methods = method_choices()
    kv_types = kv_type_choices()
    n_ctx_choices = sorted(set(N_CTX_CHOICES) | {int(base.n_ctx)})

    def doc_choices() -> list[tuple[str, str]]:
        return [(d.label(), d.key) for d in wb.library.list()]

    def view(cited: set[int] | None = None) -> tuple[str, str]:
        snap = wb.snapshot
        name = snap.doc.name if snap.doc else None
        return (gauge_html(snap.stats, doc_name=name, n_pages=len(snap.pages)),
                plot_html(snap.coverage, snap.pages, cited))

    # ------------------------------------------------------------------------------------------ handlers
    def on_ingest(file, model, method, budget, kv_type, n_ctx, progress=gr.Progress()):
        if not file:
            raise gr.Error("Choose a PDF, TXT or MD file first.")
        path = Path(file)
        settings = Settings.from_ui(model, method, budget, kv_type, n_ctx)
        progress(0.0, desc=f"Reading {path.name}")

        def report(done: int, total: int, phase: str) -> None:
            progress((done, total) if total else None, desc=PHASES.get(phase, phase.capitalize()), unit="tokens")

        try:
            doc, note = wb.ingest(path, settings, name=path.name, progress=report)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None
        client = _new_client(doc.key)
        gauge, plot = view()
        return (note, gr.update(choices=doc_choices(), value=doc.key), gauge, plot, [], client)

    def on_load(key):
        if not key:
            raise gr.Error("Pick a saved document first.")
        try:
            doc, note = wb.load(key)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None
        client = _new_client(doc.key)
        gauge, plot = view()
        return (f"{note} ({doc.settings.describe()})", gr.update(choices=doc_choices(), value=doc.key),
                gauge, plot, [], client)

    def on_forget(key):
        if key and wb.forget(key):
            return "Saved cache deleted.", gr.update(choices=doc_choices(), value=None)
        return "Nothing to delete.", gr.update(choices=doc_choices())

    def on_ask(question, client):
        client = client or _new_client()
        question = (question or "").strip()
        if not question:
            gr.Warning("Type a question first.")
            yield _messages(client["turns"]), question, gr.skip(), gr.skip(), client
            return
        client = dict(client, turns=list(client["turns"]))
        turn = {"q": question, "a": "", "cited": [], "cite": ""}
        client["turns"].append(turn)
        history = [(t["q"], t["a"]) for t in client["turns"][:-1]]
        stream = wb.ask(question, conversation=client["conv"], doc_key=client["doc"], history=history,
                        max_new_tokens=max_new_tokens)
        shown = 0.0
        try:
            for piece in stream:
                turn["a"] += piece
                if time.monotonic() - shown >= STREAM_EVERY:  # fast models: do not re-send every token
                    shown = time.monotonic()
                    yield _messages(client["turns"]), "", gr.skip(), gr.skip(), gr.skip()
        except USER_ERRORS as e:
            client["turns"].pop()
            raise gr.Error(str(e)) from None
        finally:
            stream.close()
        if not turn["a"].strip():
            turn["a"] = "(no answer)"
        snap = wb.snapshot
        if client["doc"] is None and snap.doc is not None:
            client["doc"] = snap.doc.key
        turn["cited"] = cited_pages(turn["a"], snap.pages)
        turn["cite"] = citations_markdown(turn["cited"], snap.pages, snap.coverage)
        gauge, plot = view(set(turn["cited"]))
        yield _messages(client["turns"]), "", gauge, plot, client

    def on_stop(client):
        if client:
            wb.request_stop(client["conv"])

    def on_new_chat(client):
        return [], _new_client((client or {}).get("doc"))

    def on_page_load():
        gauge, plot = view()
        snap = wb.snapshot
        return (gr.update(choices=doc_choices(), value=snap.doc.key if snap.doc else None), gauge, plot,
                _new_client(snap.doc.key if snap.doc else None))

    # ---------------------------------------------------------------------------------------------- layout
    with gr.Blocks(title="kvmerge-local", analytics_enabled=False, fill_width=True) as app:
        client = gr.State(None)
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                file = gr.File(label=f"Document (PDF, TXT or MD; up to {max_upload_mb:g} MB)",
                               file_types=list(suffixes()), type="filepath",
                               height=120, elem_id="kvm-file")
                with gr.Accordion("Model and compression", open=True):
                    model = gr.Dropdown(models, value=default_model_choice(default_model), label="Model",
                                        info="or type a GGUF path or a models.txt name",
                                        allow_custom_value=True, elem_id="kvm-model")
                    method = gr.Dropdown(methods, value=base.method, label="Compression method",
                                         info="kvmerger merges similar neighbouring tokens; full keeps all",
                                         elem_id="kvm-method")
                    budget = gr.Slider(0.05, 1.0, value=base.budget, step=0.05, label="Budget",
                                       info="KV type auto: share of the full f16 cache's memory; a KV type: share "
                                            "of the document's tokens the cache keeps (1 = no compression)")
                    with gr.Row():
                        kv_type = gr.Dropdown(kv_types, value=base.kv_type, label="KV cache type", min_width=120)
                        n_ctx = gr.Dropdown([(f"{n:,}", n) for n in n_ctx_choices], value=int(base.n_ctx),
                                            label="Context (n_ctx)", min_width=120)
                ingest_btn = gr.Button("Ingest", variant="primary", elem_id="kvm-ingest")
                status = gr.Markdown("", elem_id="kvm-status")
                with gr.Accordion("Saved documents", open=True):
                    docs = gr.Dropdown([], value=None, label="Reload a document instantly from its saved cache",
                                       elem_id="kvm-docs")
                    with gr.Row():
                        load_btn = gr.Button("Load", size="sm", elem_id="kvm-load")
                        forget_btn = gr.Button("Delete saved cache", size="sm", variant="stop")
            with gr.Column(scale=2, min_width=420):
                gauge = gr.HTML(gauge_html(None), elem_id="kvm-gauge")
                chatbot = gr.Chatbot(label="Chat", height=380, elem_id="kvm-chat", buttons=["copy"],
                                     placeholder="Ask about the document once it is ingested.",
                                     feedback_options=None)
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the document… (Enter to send)", show_label=False,
                                          scale=5, elem_id="kvm-question", autofocus=True)
                    ask_btn = gr.Button("Ask", variant="primary", scale=1, min_width=70, elem_id="kvm-ask")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="kvm-stop")
                    new_btn = gr.Button("New chat", scale=1, min_width=90, elem_id="kvm-new")
                with gr.Accordion("Where the cache holds the document", open=True):
                    plot = gr.HTML(plot_html(None, []), elem_id="kvm-plot")

        ingest_outputs = [status, docs, gauge, plot, chatbot, client]
        ingest_inputs = [file, model, method, budget, kv_type, n_ctx]
        progress_at = dict(show_progress_on=[gauge])  # one progress bar, over the gauge
        ingest_btn.click(on_ingest, ingest_inputs, ingest_outputs, api_name="ingest", **progress_at, **ENGINE)
        file.upload(on_ingest, ingest_inputs, ingest_outputs, api_visibility="private", **progress_at, **ENGINE)
        load_btn.click(on_load, [docs], ingest_outputs, api_name="load_document", **progress_at, **ENGINE)
        forget_btn.click(on_forget, [docs], [status, docs], api_name="forget", **ENGINE)
        gr.on([question.submit, ask_btn.click], on_ask, [question, client],
              [chatbot, question, gauge, plot, client], api_name="ask", show_progress="minimal", **ENGINE)
        stop_btn.click(on_stop, [client], None, api_name="stop", concurrency_limit=None, concurrency_id="stop",
                       show_progress="hidden")
        new_btn.click(on_new_chat, [client], [chatbot, client], api_name="new_chat", concurrency_limit=None,
                      show_progress="hidden")
        chatbot.clear(on_new_chat, [client], [chatbot, client], api_visibility="private", concurrency_limit=None)
        app.load(on_page_load, None, [docs, gauge, plot, client], api_visibility="private",
                 concurrency_limit=None)
    app.workbench = wb
    return app


def launch(model: str | None = None, host: str = "127.0.0.1", port: int | None = None, *,
           engine_factory: Any = None, docs_dir: str | Path | None = None, max_upload_mb: float = DEFAULT_MAX_MB,
           max_new_tokens: int = 256, block: bool = True, quiet: bool = False, **kw) -> gr.Blocks:
    """Serve the app on ``host:port`` (loopback and a free port by default).

    ``model``: the preselected model (path or models.txt name; default: the document model
    SmolLM2-135M-Instruct, ``make setup``; a warning says so when it is not downloaded).  Other keywords:
    picker defaults (``method``, ``budget``, ``kv_type``, ``n_ctx``) and engine options for every document
    (``n_gpu_layers``, ``n_threads``, ``flash_attn``, ``seed``, ``position_policy``, ``method_params``).
    ``block=False`` returns the running app at once (``app.local_url``; ``app.close()`` stops it).
    """
    unknown = sorted(set(kw) - set(ENGINE_DEFAULTS) - {"method", "budget", "kv_type", "n_ctx"})
    if unknown:
        raise TypeError(f"launch() got unexpected keyword(s): {', '.join(unknown)}")
    defaults = {k: v for k, v in kw.items() if k in ("method", "budget", "kv_type", "n_ctx")}
    engine_kwargs = {k: v for k, v in kw.items() if k in ENGINE_DEFAULTS and v is not None}
    if not model:
        missing = document_model_missing()
        if missing:
            log.warning("%s", missing)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach it can read your documents", host)
    app = build_app(engine_factory, default_model=model, library=Library(docs_dir), max_upload_mb=max_upload_mb,
                    defaults=defaults, engine_kwargs=engine_kwargs, max_new_tokens=max_new_tokens)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, max_file_size=int(max_upload_mb * 1024 * 1024), css=CSS,
               theme=gr.themes.Soft(), prevent_thread_lock=not block, quiet=quiet, show_error=True,
               inbrowser=False, ssr_mode=False, footer_links=["api"])
    if block:
        app.workbench.close()
    return app
