"""The UI's engine owner on the real Session and a tiny model: ingest, saved caches, stop, abandoned streams,
per-tab conversations (no Gradio server here)."""
from __future__ import annotations

import pytest

from kvmerge_local.errors import KVMergeError
from test_ui_support import STORY, make_pdf
from kvmerge_local.ui.choices import Settings
from kvmerge_local.ui.documents import UploadError
from kvmerge_local.ui.library import Library
from kvmerge_local.ui.workbench import NoDocumentError, Workbench

pytestmark = [pytest.mark.llama, pytest.mark.slow]

N_NEW = 16
SETTINGS = Settings(n_ctx=1024)
OPEN = {"n_threads": 1}


@pytest.fixture(scope="module")
def model(tiny_llama_small):
    return str(tiny_llama_small)


@pytest.fixture(scope="module")
def pdf(tmp_path_factory):
    return make_pdf(tmp_path_factory.mktemp("doc") / "lighthouse.pdf", STORY)


@pytest.fixture(scope="module")
def reference(model, pdf):
    """Answers of the engine used directly: q1, q2 on a fresh chat each, and q3 after q1."""
    from kvmerge_local import Session

    with Session.open(model, **SETTINGS.open_kwargs(), **OPEN) as s:
        stats = s.ingest(pdf)
        ref = {"stats": stats.as_dict(), "pages": s.pages}
        ref["q1"] = "".join(s.ask("Who kept the log?", max_new_tokens=N_NEW))
        ref["q1q3"] = "".join(s.ask("What failed in March?", max_new_tokens=N_NEW))
        s.reset_chat()
        ref["q2"] = "".join(s.ask("Where did Mara retire?", max_new_tokens=N_NEW))
    assert ref["q1"] != ref["q2"], "the tiny model answers two questions alike: the tests could not tell them apart"
    return ref


@pytest.fixture
def bench(model, tmp_path):
    wb = Workbench(library=Library(tmp_path / "docs"), engine_kwargs=OPEN)
    yield wb, Settings(model=model, n_ctx=SETTINGS.n_ctx)
    wb.close()


def ask(wb, q, conv, **kw):
    return "".join(wb.ask(q, conversation=conv, max_new_tokens=N_NEW, **kw))


def test_ingest_saves_the_cache_and_reloads_it(bench, pdf, reference, tmp_path):
    wb, settings = bench
    seen = []
    doc, note = wb.ingest(pdf, settings, progress=lambda d, t, ph: seen.append((d, t, ph)))
    assert "ingested lighthouse.pdf" in note and "saved for next time" in note
    assert seen and seen[-1][2] == "saving the compressed cache" and any(ph == "prefill" for _, _, ph in seen)
    snap = wb.snapshot
    assert snap.stats["tokens_ingested"] == reference["stats"]["tokens_ingested"]
    assert snap.pages == reference["pages"] and snap.coverage is not None
    kept = reference["stats"]["doc_cells"] / reference["stats"]["tokens_ingested"]  # the default memory plan's
    assert kept < 1 and snap.coverage.mean == pytest.approx(kept, abs=0.1)
    assert [d.key for d in wb.library.list()] == [doc.key] and doc.cache_path.is_file()
    assert ask(wb, "Who kept the log?", "tab1") == reference["q1"]

    # Another document, then back: the first reloads from its saved cache, answers unchanged.
    txt = tmp_path / "other.txt"
    txt.write_text("A short note about tides and the moon.")
    other, _ = wb.ingest(txt, settings)
    assert wb.current_doc.key == other.key and wb.snapshot.pages == []
    again, note = wb.ingest(pdf, settings)
    assert again.key == doc.key and "ingested before" in note and "from its saved cache" in note
    assert ask(wb, "Who kept the log?", "tab2") == reference["q1"]
    assert wb.snapshot.stats["t_prefill"] > 0  # the original ingestion's times are kept


def test_an_unusable_saved_cache_is_replaced_by_a_new_ingestion(bench, pdf, reference):
    wb, settings = bench
    doc, _ = wb.ingest(pdf, settings)
    data = doc.cache_path.read_bytes()
    doc.cache_path.write_bytes(data[: len(data) // 2])  # truncated on disk
    wb.close()
    again, note = wb.ingest(pdf, settings)
    assert again.key == doc.key and note.startswith("ingested lighthouse.pdf") and "could not be used" in note
    assert doc.cache_path.stat().st_size > 0.9 * len(data)  # saved again, whole
    assert ask(wb, "Who kept the log?", "tab") == reference["q1"]


def test_a_refused_upload_leaves_the_current_document(bench, pdf, reference, tmp_path):
    wb, settings = bench
    wb.ingest(pdf, settings)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UploadError, match="empty"):
        wb.ingest(empty, settings)
    blank = tmp_path / "scan.pdf"
    make_pdf(blank, [""])
    with pytest.raises(ValueError, match="no extractable text"):
        wb.ingest(blank, settings)
    with pytest.raises(KVMergeError, match="no-such-model"):
        wb.ingest(pdf, Settings(model="no-such-model"))
    assert wb.current_doc.name == "lighthouse.pdf"
    assert ask(wb, "Who kept the log?", "tab") == reference["q1"]


def test_no_document_is_a_clear_error(bench):
    wb, _ = bench
    with pytest.raises(NoDocumentError, match="No document yet"):
        ask(wb, "Anything?", "tab")
    with pytest.raises(NoDocumentError, match="no longer on disk"):
        wb.load("0123-gone")


def test_conversations_are_kept_apart(bench, pdf, reference):
    wb, settings = bench
    doc, _ = wb.ingest(pdf, settings)
    assert ask(wb, "Who kept the log?", "A", doc_key=doc.key) == reference["q1"]
    assert ask(wb, "What failed in March?", "A", doc_key=doc.key,
               history=[("Who kept the log?", reference["q1"])]) == reference["q1q3"]  # multi-turn
    assert ask(wb, "Where did Mara retire?", "B", doc_key=doc.key) == reference["q2"]  # fresh chat for B
    assert ask(wb, "Who kept the log?", "C") == reference["q1"]  # no doc key: the current document


def test_stop_and_abandoned_streams_leave_the_engine_consistent(bench, pdf, reference):
    wb, settings = bench
    wb.ingest(pdf, settings)
    stream = wb.ask("Who kept the log?", conversation="A", max_new_tokens=N_NEW)
    first = next(stream)
    assert wb.request_stop("A") and not wb.request_stop("nobody")
    rest = list(stream)
    assert rest == [] and reference["q1"].startswith(first)
    assert not wb.request_stop("A")  # finished: nothing left to stop, nothing kept per conversation

    # A stream abandoned mid-answer (closed tab, cancelled event) is closed by the next request.
    abandoned = wb.ask("Who kept the log?", conversation="B", max_new_tokens=N_NEW)
    next(abandoned)
    assert ask(wb, "Where did Mara retire?", "C") == reference["q2"]
    assert list(abandoned) == []  # it does not resume on a context someone else now uses
    assert ask(wb, "Who kept the log?", "D") == reference["q1"]
