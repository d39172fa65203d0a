"""The real-model tier: SmolLM2-135M-Instruct (the document model ``make setup`` pulls, through
``default_document_model()``) on the bundled sample PDF, end to end through the GGUF's chat template.

Skipped only when the model file is absent (``make test`` runs ``make setup`` first, so in CI it is there);
a file that is present but does not verify fails.  Sized for ~1 minute on 2 cores: one small model, short
answers, a long document of ~4.5x a 512-cell context.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvmerge_local import Session
from kvmerge_local.cli import DEMO_EXPECTED, DEMO_QUESTION, answer_pages
from kvmerge_local.defaults import DEFAULT_METHOD
from kvmerge_local.engine.documents import load_document
from kvmerge_local.engine.templates import JOIN
from test_chat_templates import _spy_decode  # the llama_decode spy the chat-template tests use

pytestmark = pytest.mark.llama

SAMPLE = Path(__file__).resolve().parent.parent / "kvmerge_local" / "data" / "sample.pdf"
QUESTIONS = (DEMO_QUESTION, "Who led the survey team?", "How deep is the lake at its deepest point?")
NEEDLE = "The survey boat was named Blue Heron."
THREADS = 2


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from kvmerge_local.models import DOCUMENT_MODEL, default_document_model, get_entry

    path = get_entry(DOCUMENT_MODEL).local_path
    if not path.is_file():
        pytest.skip(f"the document model {DOCUMENT_MODEL} is not downloaded ({path}): `make setup` or "
                    f"`kvmerge-local pull {DOCUMENT_MODEL}` gets it")
    return default_document_model()  # present: it must verify (size, sha256)


def _open(model: Path, **kw) -> Session:
    kw = {"n_ctx": 1024, "n_threads": THREADS, "method": DEFAULT_METHOD, "budget": 0.5, **kw}
    return Session.open(model, **kw)


def _ask(s: Session, q: str, n: int = 24) -> str:
    return "".join(s.ask(q, max_new_tokens=n))


def _expect_sample_fact(answer: str) -> None:
    word, page = DEMO_EXPECTED
    doc = load_document(SAMPLE)
    assert word in answer.lower(), answer
    assert answer_pages(answer, doc.text, doc.pages) == [page], answer


def test_full_cache_answers_the_sample_fact(smollm2):
    with _open(smollm2, method="full", budget=1.0) as s:
        st = s.ingest(SAMPLE)
        assert s.fmt.name == "gguf" and st.n_compactions == 0 and st.doc_cells == st.tokens_ingested
        assert [p for p, _, _ in s.pages] == [1, 2, 3]
        _expect_sample_fact(_ask(s, DEMO_QUESTION))
        s.reset_chat()
        assert "marrow" in _ask(s, QUESTIONS[1]).lower()


def test_three_turns_over_a_compressed_document_keep_the_seam(smollm2, monkeypatch):
    """Budget 0.5, the default method: every token fed (document prefill, then each question after the
    cached text) is the tokenization of the whole rendered conversation at once; the compressed cache still
    answers the demo's question."""
    doc = load_document(SAMPLE)
    with _open(smollm2) as s:
        fed = _spy_decode(monkeypatch, s)
        st = s.ingest(SAMPLE)
        assert st.n_compactions >= 1 and st.doc_cells == st.tokens_ingested // 2
        turns: list[tuple[str, str]] = []
        for i, q in enumerate(QUESTIONS):
            n0 = len(fed)
            answer = _ask(s, q, 32)
            assert answer.strip() and "<|im_end|>" not in answer and "<|im_start|>" not in answer
            msgs = []
            for j, (uq, a) in enumerate(turns):
                msgs += [{"role": "user", "content": (doc.text + JOIN + uq) if j == 0 else uq},
                         {"role": "assistant", "content": a}]
            msgs.append({"role": "user", "content": (doc.text + JOIN + q) if not turns else q})
            expect = [int(t) for t in s.model.tokenize(s.fmt.render(msgs), add_bos=s.fmt.add_bos, special=True)]
            assert fed[:len(expect)] == expect, f"turn {i + 1}"
            assert len(fed) > len(expect) >= n0  # then the answer's own tokens
            if i == 0:
                _expect_sample_fact(answer)
            turns.append((q, answer))
        assert s.stats.doc_cells == st.doc_cells  # the document cache is untouched by the chat


def test_save_load_round_trips_the_compressed_document(smollm2, tmp_path):
    q = QUESTIONS[1]
    with _open(smollm2) as s:
        st = s.ingest(SAMPLE)
        logits = s.peek_logits(DEMO_QUESTION)
        answers = [_ask(s, DEMO_QUESTION), _ask(s, q)]
        path = s.save(tmp_path / "sample.kvm")
    _expect_sample_fact(answers[0])
    with Session.load(path, n_threads=THREADS) as t:
        assert t.stats.doc_cells == st.doc_cells and t.pages == s.pages
        np.testing.assert_array_equal(t.peek_logits(DEMO_QUESTION), logits)
        assert [_ask(t, DEMO_QUESTION), _ask(t, q)] == answers


def test_document_four_times_the_context_ingests_compressing_as_it_goes(smollm2):
    """~4.5x n_ctx of text (the sample's text three times, a needle sentence, one more paragraph): chunked
    prefill with several compactions, never more cells than n_ctx, and the needle -- in the last chunk,
    which the cache keeps whole -- is answered."""
    n_ctx = 512
    base = load_document(SAMPLE).text
    text = "\n\n".join([base] * 3) + "\n\n" + NEEDLE + "\n\n" + base[:600]
    seen: list[int] = []
    with _open(smollm2, n_ctx=n_ctx) as s:
        st = s.ingest(text, progress=lambda p: seen.append(p.cells))
        assert st.tokens_ingested >= 4 * n_ctx
        assert st.n_compactions >= 4 and st.cells_in_use <= n_ctx and max(seen) <= n_ctx - s.reserve
        assert st.doc_cells < st.tokens_ingested / 4
        answer = _ask(s, "What was the survey boat called?")
        assert "blue heron" in answer.lower(), answer
        assert s.stats.cells_in_use <= n_ctx
