"""Sessions on real llama.cpp with tiny models: chunked ingest, compress-as-you-go, re-indexing, chat turns,
save/load, and bad inputs that must leave the session usable."""
from __future__ import annotations

import time

import numpy as np
import pytest

from kvmerge_local import Session
from kvmerge_local.engine import DocumentError, IngestProgress, SavedCacheError, Stats
from kvmerge_local.errors import KVMergeError
from kvmerge_local.plan import Plan

pytestmark = pytest.mark.llama

WORDS = ("the river runs north past the stone house where light falls on paper and the "
         "old mill turns slowly under a grey sky while birds sing").split()


def text_of(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)) + "."


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory(vocab="llama2-small", n_vocab=4096, n_ctx_train=512)


@pytest.fixture()
def session(model_path):
    s = Session.open(model_path, n_ctx=256, n_threads=2)
    yield s
    s.close()


def answer(s, q="What is it?", n=8) -> str:
    return "".join(s.ask(q, max_new_tokens=n))


def test_carry_evidence_sums_members():
    # one (l, h), three slots: copy of 0, merge of {1, 2} (key weights), value-only source 3 in slot 2
    plan = Plan(n_in=4, offsets=np.array([[[0, 1, 3, 5]]], np.int64), src=np.array([0, 1, 2, 3, 3], np.int32),
                wk=np.array([1, .5, .5, 0, 1], np.float32), wv=np.array([1, .5, .5, 1, 1], np.float32),
                pos=np.array([[[0, 2, 3]]], np.int32))
    ev = np.array([[[1.0, 2.0, 4.0, 8.0]]], np.float32)
    np.testing.assert_array_equal(plan.carry_evidence(ev), [[[1.0, 6.0, 8.0]]])


def test_document_of_four_n_ctx_ingests_and_answers(session):
    seen: list[IngestProgress] = []
    cells_now = []

    def progress(p):
        seen.append(p)
        cells_now.append(session.stats.cells_in_use)

    t0 = time.perf_counter()
    st = session.ingest(text_of(900), progress=progress)
    took = time.perf_counter() - t0
    assert st.tokens_ingested >= 4 * 256
    assert max(cells_now) <= 256 and max(p.cells for p in seen) <= 256 - session.reserve
    assert st.doc_cells <= 256 - session.reserve and st.n_compactions >= 4
    assert st.n_reindex >= 1  # 1000+ tokens on a model trained for 512
    assert seen[-1].done_tokens == st.tokens_ingested and {p.phase for p in seen} == {"prefill", "compact"}
    assert st.ratio < 0.25 and st.kv_bytes_now == st.doc_cells * st.bytes_per_cell
    kp = session.kept_positions()
    assert kp.shape == (2, 2, st.doc_cells) and kp.dtype == np.int32
    assert kp.max() == st.tokens_ingested - 1 and np.all(np.diff(kp, axis=2) > 0)
    assert answer(session, n=5) is not None
    print(f"\n4x n_ctx: {st.tokens_ingested} tokens in {took:.2f}s -> {st.doc_cells} cells, ratio {st.ratio:.3f}")


def test_short_document_compresses_to_budget_and_keeps_positions(model_path):
    with Session.open(model_path, n_ctx=512, budget=0.5, n_threads=2) as s:
        st = s.ingest(text_of(150))
        assert st.doc_cells == round(0.5 * st.tokens_ingested) and st.n_reindex == 0
        # keep policy: the newest token kept at its own position, decoding continues after it
        assert s.ctx.n_past == st.tokens_ingested
        assert isinstance(st, Stats) and st.as_dict()["kv_bytes_saved"] > 0


@pytest.mark.parametrize("kv,policy", [("q8_0", "reindex"), ("bf16", "reindex"), ("f16", "keep")])
def test_cache_types_and_policies(model_path, kv, policy):
    with Session.open(model_path, n_ctx=256, kv_type=kv, position_policy=policy, n_threads=2) as s:
        st = s.ingest(text_of(300))
        assert st.n_compactions >= 1 and (st.n_reindex >= 1) == (policy == "reindex")
        logits = s.peek_logits("Where does the river run?")
        assert np.all(np.isfinite(logits))
        if policy == "reindex":
            assert s.ctx.n_past == st.doc_cells


def test_save_load_identical_logits(session, model_path, tmp_path):
    session.ingest(text_of(400))
    answer(session)  # chat turns are not saved
    path = session.save(tmp_path / "doc.kvm")
    session.reset_chat()
    expect = session.peek_logits("Where is the mill?")
    with Session.load(path, n_threads=2) as s2:
        np.testing.assert_array_equal(s2.peek_logits("Where is the mill?"), expect)
        assert s2.stats.doc_cells == session.stats.doc_cells
        np.testing.assert_array_equal(s2.kept_positions(), session.kept_positions())
    session.restore(path)
    np.testing.assert_array_equal(session.peek_logits("Where is the mill?"), expect)


def test_corrupt_and_foreign_caches_are_refused(session, tiny_model_factory, tmp_path):
    session.ingest(text_of(200))
    good = session.save(tmp_path / "good.kvm")
    expect = session.peek_logits("Where?")
    raw = bytearray(good.read_bytes())
    bad = tmp_path / "bad.kvm"
    raw[-100] ^= 0xFF
    bad.write_bytes(bytes(raw))
    trunc = tmp_path / "trunc.kvm"
    trunc.write_bytes(good.read_bytes()[:-1000])
    junk = tmp_path / "junk.kvm"
    junk.write_bytes(b"hello world" * 10)
    for p, msg in ((bad, "corrupt"), (trunc, "corrupt or truncated"), (junk, "not a kvmerge-local"),
                   (tmp_path / "none.kvm", "not found")):
        with pytest.raises(SavedCacheError, match=msg):
            session.restore(p)
    other = tiny_model_factory(vocab="llama2-small", n_vocab=4096, n_ctx_train=512, seed=7)
    with Session.open(other, n_ctx=256, n_threads=2) as s2:
        s2.ingest(text_of(50))
        with pytest.raises(SavedCacheError, match="another model"):
            s2.restore(good)
        assert s2.stats.doc_cells > 0 and answer(s2, n=2) is not None
    with Session.open(session.model.path, n_ctx=256, kv_type="q8_0", n_threads=2) as s3:
        with pytest.raises(SavedCacheError, match="kv_type"):
            s3.restore(good)
    np.testing.assert_array_equal(session.peek_logits("Where?"), expect)


def test_failed_answer_leaves_state_intact(session, monkeypatch):
    session.ingest(text_of(200))
    answer(session, "First question?", n=4)
    n_past, turns = session.ctx.n_past, list(session.chat.turns)
    expect = session.peek_logits("Next?")
    real = session.ctx.decode
    calls = {"n": 0}

    def flaky(tokens, positions=None, logits="last"):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KVMergeError("injected failure")
        return real(tokens, positions, logits)

    monkeypatch.setattr(session.ctx, "decode", flaky)
    with pytest.raises(KVMergeError, match="injected"):
        answer(session, "Next?", n=10)
    monkeypatch.setattr(session.ctx, "decode", real)
    assert session.ctx.n_past == n_past and session.chat.turns == turns
    np.testing.assert_array_equal(session.peek_logits("Next?"), expect)


def test_multi_turn_drops_old_turns(model_path):
    with Session.open(model_path, n_ctx=256, budget=100, n_threads=2) as s:
        s.ingest(text_of(100))
        doc_cells = s.stats.doc_cells
        for i in range(8):
            gen = s.ask(f"Question number {i}?", max_new_tokens=20)
            assert "".join(gen) is not None
            assert s.stats.cells_in_use <= 256
        assert 1 <= len(s.chat.turns) < 8 and s.stats.doc_cells == doc_cells
        # dropped turns leave no gaps: the chat cells sit right after the document, turn after turn
        pos = np.sort(s.bridge.cell_positions())
        doc_end = s.cache.end()
        chat = pos[pos >= doc_end]
        np.testing.assert_array_equal(chat, np.arange(doc_end, doc_end + len(chat)))
        assert s.chat.turns[0][0] == doc_end and all(a[1] == b[0] for a, b in zip(s.chat.turns, s.chat.turns[1:]))
        # a stream closed early keeps its partial turn and the session goes on
        g = s.ask("Partial?", max_new_tokens=20)
        next(iter(g), None)
        g.close()
        s.reset_chat()
        assert s.stats.cells_in_use == doc_cells and s.chat.turns == []


def test_bad_inputs_leave_session_usable(session, tmp_path):
    session.ingest(text_of(100))
    expect = session.peek_logits("Q?")
    (tmp_path / "e.txt").write_text("   \n")
    (tmp_path / "x.docx").write_bytes(b"PK..")
    for doc, exc in (("", DocumentError), ("  \n ", DocumentError), (tmp_path / "none.txt", DocumentError),
                     (tmp_path / "e.txt", DocumentError), (tmp_path / "x.docx", DocumentError), (42, TypeError)):
        with pytest.raises(exc):
            session.ingest(doc)
    for kw in ({"max_new_tokens": 0}, {"temperature": -1.0}):
        with pytest.raises(ValueError):
            session.ask("Q?", **kw)
    with pytest.raises(ValueError):
        session.ask("   ")
    with pytest.raises(ValueError, match="question needs"):
        session.ask("word " * 400)
    np.testing.assert_array_equal(session.peek_logits("Q?"), expect)


@pytest.mark.parametrize("kw,match", [({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"),
                                      ({"method": "nope"}, "unknown method"),
                                      ({"position_policy": "shift"}, "position_policy"),
                                      ({"method_params": {"bogus": 1}}, "no parameter"), ({"kv_type": "q3"}, "unknown cache type .q3."),
                                          ({"memory": 1.5}, "memory must be a fraction in"),
                                      ({"n_ctx": 8}, "n_ctx"), ({"chat_format": "chatml"}, "chat format")])
def test_bad_open_arguments(model_path, kw, match):
    with pytest.raises(ValueError, match=match):
        Session.open(model_path, **kw).close()


def test_full_method_refuses_a_document_that_does_not_fit(model_path):
    with Session.open(model_path, n_ctx=256, method="full", n_threads=2) as s:
        with pytest.raises(ValueError, match="keeps every token"):
            s.ingest(text_of(300))
        assert s.ingest(text_of(40)).doc_cells == s.stats.tokens_ingested


def test_sampling_is_seeded(model_path):
    outs = []
    for _ in range(2):
        with Session.open(model_path, n_ctx=256, seed=3, n_threads=2) as s:
            s.ingest(text_of(60))
            outs.append("".join(s.ask("Q?", max_new_tokens=8, temperature=0.8)))
    assert outs[0] == outs[1]


def test_closed_session_and_missing_default(session, monkeypatch, tmp_path):
    from kvmerge_local import models

    monkeypatch.setattr(models, "DATA_DIR", tmp_path)
    with pytest.raises(KVMergeError, match="no embedded default model"):
        Session.open()
    session.close()
    with pytest.raises(KVMergeError, match="closed"):
        session.ask("Q?")


def test_uncompressed_chunked_ingest_matches_plain_prefill(model_path):
    """Budget 1.0, no compaction: the session's cache and seam give exactly the logits of a plain llama.cpp
    prefill of the whole text (document + question) tokenized at once, decoded in the same chunks."""
    from kvmerge_local.bridge import LlamaContext

    q = "Where does the river run?"
    with Session.open(model_path, n_ctx=512, budget=1.0, n_threads=2) as s:
        doc = text_of(200, seed=4)
        st = s.ingest(doc)
        chunk = (512 - s.reserve) // 2
        assert st.n_compactions == 0 and st.tokens_ingested > chunk  # at least two chunks
        got = s.peek_logits(q)
        whole = s.model.tokenize(doc + "\n\nQuestion: " + q + "\nAnswer:", add_bos=True)
        n_doc = st.tokens_ingested
        ctx = LlamaContext(s.model, n_ctx=512, n_threads=2)
        for i in range(0, n_doc, chunk):
            ctx.decode(whole[i:min(i + chunk, n_doc)], logits="none")
        expect = ctx.decode(whole[n_doc:])
        ctx.close()
    np.testing.assert_array_equal(got, expect)
