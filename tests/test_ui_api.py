"""Headless API tests: the app served on 127.0.0.1 with the real engine and a tiny model, driven by
``gradio_client`` — upload, ingest, streamed answers, stats, saved caches, errors, two clients at once."""
from __future__ import annotations

import re
import threading
import time

import pytest
from gradio_client import Client, handle_file
from kvmerge_local.defaults import DEFAULT_METHOD
from gradio_client.exceptions import AppError

from test_ui_support import STORY, TIMEOUT, answers, make_pdf, norm, served_app, text_of

pytestmark = [pytest.mark.llama, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:unclosed event loop:ResourceWarning"),  # Gradio's server threads
              pytest.mark.filterwarnings("ignore:::gradio.queueing")]  # pandas deprecations inside Gradio


N_NEW = 16
N_CTX = 1024
MAX_MB = 1.0
Q1, Q2, Q3 = "Who kept the log?", "Where did Mara retire?", "What failed in March?"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui_api")
    return {"pdf": make_pdf(d / "lighthouse.pdf", STORY), "dir": d}


@pytest.fixture(scope="module")
def reference(tiny_llama_small, docs):
    """The engine used directly with the app's settings: answers to Q1 and Q2 on fresh chats, Q3 after Q1
    (whitespace collapsed, as :func:`answers` gives them)."""
    from kvmerge_local import Session

    with Session.open(str(tiny_llama_small), n_ctx=N_CTX, n_threads=1) as s:
        ref = {"stats": s.ingest(docs["pdf"]).as_dict()}
        ref[Q1] = norm("".join(s.ask(Q1, max_new_tokens=N_NEW)))
        ref[Q3] = norm("".join(s.ask(Q3, max_new_tokens=N_NEW)))
        s.reset_chat()
        ref[Q2] = norm("".join(s.ask(Q2, max_new_tokens=N_NEW)))
    assert ref[Q1] != ref[Q2]
    return ref


@pytest.fixture(scope="module")
def app(tiny_llama_small, docs):
    with served_app(tiny_llama_small, docs["dir"] / "saved", n_ctx=N_CTX, max_new_tokens=N_NEW,
                    max_upload_mb=MAX_MB) as a:
        assert a.local_url.startswith("http://127.0.0.1:")
        yield a


def client(app) -> Client:
    return Client(app.local_url, verbose=False, download_files=False)


def ingest(c: Client, path, model: str):
    """Upload ``path`` and ingest it with the default picker values; the handler's outputs."""
    job = c.submit(handle_file(str(path)), model, DEFAULT_METHOD, 0.5, "f16", N_CTX, api_name="/ingest")
    return job.result(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def model(tiny_llama_small) -> str:
    return str(tiny_llama_small)


def ask(c: Client, question: str):
    """(every streamed chatbot value, the final outputs)."""
    job = c.submit(question, api_name="/ask")
    final = job.result(timeout=TIMEOUT)
    return job.outputs(), final


def test_upload_ingest_ask_streams_and_updates_stats(app, docs, model, reference):
    c = client(app)
    status, doc_list, gauge, plot, chat = ingest(c, docs["pdf"], model)
    assert "ingested lighthouse.pdf" in status
    assert doc_list["value"] and doc_list["value"] in [k for _, k in doc_list["choices"]]
    tokens = reference["stats"]["tokens_ingested"]
    assert f">{tokens:,}<" in gauge and "3 pages" in gauge and "Compression" in gauge
    assert plot.count("<svg") == 1 and ">p1<" in plot and ">p3<" in plot
    assert chat == []

    outputs, (chat, box, gauge2, plot2) = ask(c, Q1)
    streamed = [answers(o[0])[-1] for o in outputs if o and answers(o[0])]
    assert len(streamed) >= 2 and streamed[-1] == reference[Q1]
    assert all(reference[Q1].startswith(s) for s in streamed)  # the answer grows piece by piece
    assert [m["role"] for m in chat][:2] == ["user", "assistant"] and answers(chat) == [reference[Q1]]
    assert box == ""
    assert "last answer" in gauge2 and gauge2 != gauge  # stats updated after the answer

    # Multi-turn: the second question continues the conversation.
    _, (chat, *_rest) = ask(c, Q3)
    assert answers(chat) == [reference[Q1], reference[Q3]]

    # New chat: a fresh conversation on the same document.
    c.predict(api_name="/new_chat")
    _, (chat, *_rest) = ask(c, Q2)
    assert answers(chat) == [reference[Q2]]


def test_two_clients_at_once_get_their_own_answers(app, docs, model, reference):
    ingest(client(app), docs["pdf"], model)
    a, b = client(app), client(app)
    results: dict[str, object] = {}
    start = threading.Barrier(2)

    def run(c: Client, q: str) -> None:
        start.wait(timeout=TIMEOUT)
        try:
            results[q] = ask(c, q)[1][0]
        except Exception as e:  # reported below with the question
            results[q] = e

    threads = [threading.Thread(target=run, args=(a, Q1)), threading.Thread(target=run, args=(b, Q2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a question hung"
    for q in (Q1, Q2):
        assert not isinstance(results[q], Exception), (q, results[q])
        assert answers(results[q]) == [reference[q]], q
        assert text_of(results[q][0]) == q

    # Each client goes on with its own conversation, whoever used the engine in between.
    _, (chat_a, *_r) = ask(a, Q3)
    assert answers(chat_a)[0] == reference[Q1] and len(answers(chat_a)) == 2


def test_saved_documents_reload_and_list(app, docs, model, reference):
    c = client(app)
    _, doc_list, *_ = ingest(c, docs["pdf"], model)
    pdf_key = doc_list["value"]
    note = docs["dir"] / "note.md"
    note.write_text("# Tides\n\nThe moon pulls the sea twice a day.")
    status, doc_list, gauge, *_ = ingest(c, note, model)
    assert "ingested note.md" in status and len(doc_list["choices"]) >= 2
    assert "1 page" not in gauge  # plain text has no pages
    note_key = doc_list["value"]

    status, doc_list, gauge, plot, chat = c.predict(pdf_key, api_name="/load_document")
    assert re.search(r"loaded lighthouse\.pdf from its saved cache in \d+ ms", status), status
    assert doc_list["value"] == pdf_key and ">p2<" in plot and chat == []
    _, (chat, *_r) = ask(c, Q1)
    assert answers(chat) == [reference[Q1]]

    status, doc_list = c.predict(note_key, api_name="/forget")
    assert status == "Saved cache deleted." and note_key not in [k for _, k in doc_list["choices"]]
    assert pdf_key in [k for _, k in doc_list["choices"]]
    with pytest.raises(AppError, match="no longer on disk|not in the list of choices"):
        c.predict(note_key, api_name="/load_document")


def test_refused_uploads_say_why(app, docs, model, reference):
    c = client(app)
    ingest(c, docs["pdf"], model)
    d = docs["dir"]
    (d / "empty.txt").write_text("")
    (d / "slides.docx").write_bytes(b"PK\x03\x04")
    (d / "big.txt").write_text("word " * int(MAX_MB * 1024 * 1024 / 4))
    make_pdf(d / "scan.pdf", ["", ""])
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(200, 200)
    w.encrypt("secret", algorithm="RC4-128")
    w.write(str(d / "locked.pdf"))
    cases = {"empty.txt": "empty", "scan.pdf": "no extractable text", "locked.pdf": "encrypted",
             "slides.docx": "Invalid file type|unsupported file type", "big.txt": "maximum file size|upload limit"}
    for name, why in cases.items():
        with pytest.raises((AppError, ValueError), match=why):
            ingest(c, d / name, model)
    _, (chat, *_r) = ask(c, Q1)  # the document from before is still there
    assert answers(chat) == [reference[Q1]]
    with pytest.raises(AppError, match="Pick a saved document"):
        c.predict(None, api_name="/load_document")


def test_stop_ends_a_long_answer_early(tiny_llama_small, docs, model):
    """Stop is not queued behind the running answer (its own concurrency group) and cuts it short; the
    engine then answers the next question normally."""
    from kvmerge_local import Session

    long_new = 1500  # about a second of the tiny model's decoding
    with Session.open(model, n_ctx=2048, n_threads=1) as s:
        s.ingest(docs["pdf"])
        full = norm("".join(s.ask(Q1, max_new_tokens=long_new)))
    assert len(full) > 3000, "the tiny model ends its answer early: nothing to stop"
    with served_app(tiny_llama_small, docs["dir"] / "saved_stop", n_ctx=2048, max_new_tokens=long_new) as app:
        c = client(app)
        c.submit(handle_file(str(docs["pdf"])), model, DEFAULT_METHOD, 0.5, "f16", 2048,
                 api_name="/ingest").result(timeout=TIMEOUT)
        job = c.submit(Q1, api_name="/ask")
        deadline = time.monotonic() + TIMEOUT
        while not job.outputs() and time.monotonic() < deadline:
            time.sleep(0.005)
        c.predict(api_name="/stop")
        stopped = answers(job.result(timeout=TIMEOUT)[0])[-1]
        assert stopped and full.startswith(stopped) and len(stopped) < len(full), (len(stopped), len(full))
        c.predict(api_name="/new_chat")
        _, (chat, *_r) = ask(c, Q2)
        assert answers(chat)[-1] != "" and len(answers(chat)) == 1
