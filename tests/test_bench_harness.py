"""Benchmark harness: scoring, task-file validation, method/budget parsing, and the exact tokens the model
reads (context + question tokenized as ONE text) on a tiny llama.cpp model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvmerge_local.quality import harness as h
from kvmerge_local.quality import perplexity as ppl


def test_normalize_and_score():
    assert h.normalize("  The Mill.\n") == "mill"
    assert h.score(" mill.", "mill") == (True, True)
    assert h.score(" the old mill turns", "Mill") == (True, False)
    assert h.score(" millstone.", "mill") == (False, False)  # whole words only
    assert h.score(" c. VAR c = b. VAR a = river.", "river") == (True, False)
    assert h.score("", "mill") == (False, False)
    assert h.score("anything", "...") == (False, False)  # an answer that normalizes to nothing never matches


def test_split_prompt_keeps_text():
    for ctx, q in [("abc", "\n\nQ"), ("abc \n", "\n\nQ"), ("abc\n\n", "Q")]:
        doc, rest = h.split_prompt(ctx, q)
        assert doc + rest == ctx + q and doc == doc.rstrip()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


REC = {"id": "a", "task": "t", "context": "Some text.", "question": "\n\nQuestion: x?\nAnswer:", "answer": "y"}


def test_load_tasks_errors(tmp_path):
    with pytest.raises(h.BenchError, match="not found"):
        h.load_tasks(tmp_path / "nope.jsonl")
    p = _write(tmp_path / "bad.jsonl", [json.dumps(REC), '{"id": "b", "task": '])
    with pytest.raises(h.BenchError, match=r"bad\.jsonl:2: not valid JSON"):
        h.load_tasks(p)
    p = _write(tmp_path / "miss.jsonl", [json.dumps({k: v for k, v in REC.items() if k != "answer"})])
    with pytest.raises(h.BenchError, match=r":1: missing key\(s\) answer"):
        h.load_tasks(p)
    p = _write(tmp_path / "dup.jsonl", [json.dumps(REC), json.dumps(REC)])
    with pytest.raises(h.BenchError, match="duplicate id"):
        h.load_tasks(p)
    p = _write(tmp_path / "type.jsonl", [json.dumps(dict(REC, answer=3))])
    with pytest.raises(h.BenchError, match="must be strings"):
        h.load_tasks(p)
    with pytest.raises(h.BenchError, match="no records"):
        h.load_tasks(_write(tmp_path / "empty.jsonl", [""]))


def test_load_tasks_limit_per_type(tmp_path):
    recs = [dict(REC, id=str(i), task="ab"[i % 2]) for i in range(7)]
    p = _write(tmp_path / "t.jsonl", [json.dumps(r) for r in recs])
    got = h.load_tasks(p, limit=2)
    assert [r["id"] for r in got] == ["0", "1", "2", "3"]
    assert len(h.load_tasks(p)) == 7


def test_parse_methods_budgets():
    assert h.parse_methods("full, kvmerger,h2o,kvmerger") == ["full", "kvmerger", "h2o"]
    assert isinstance(h.make_method("cam+tova").base, type(h.make_method("tova")))
    with pytest.raises(h.BenchError, match="unknown method 'nope'"):
        h.parse_methods("kvmerger,nope")
    with pytest.raises(h.BenchError, match="no methods"):
        h.parse_methods(" , ")
    assert h.parse_budgets("0.5,0.35, 0.2") == [0.5, 0.35, 0.2]
    for bad in ("1.5", "0", "-0.2", "0.5,2"):
        with pytest.raises(h.BenchError, match="out of range"):
            h.parse_budgets(bad)
    with pytest.raises(h.BenchError, match="not a number"):
        h.parse_budgets("half")
    assert h.configs(["full", "h2o"], [0.5, 0.2]) == [("full", 1.0), ("h2o", 0.5), ("h2o", 0.2)]


def test_split_text():
    text = "one two three.\n\nfour five six.\n\nseven eight nine."
    a, b = ppl.split_text(text, 0.6)
    assert a + b == text and b.startswith("\n\n") and a == a.rstrip()


# ---------------------------------------------------------------------------------------- with llama.cpp
@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory(vocab="llama2-small", n_vocab=4096, n_ctx_train=512)


def _context(n: int, seed: int, trailing: str = "") -> str:
    words = "the river runs north past the stone house where light falls on paper and old mill".split()
    rng = np.random.default_rng(seed)
    return "The special magic word for apple is mill. " + " ".join(rng.choice(words, n)) + "." + trailing


@pytest.mark.llama
@pytest.mark.parametrize("method,trailing", [("full", ""), ("kvmerger", " \n"), ("h2o", "\n\n")])
def test_fed_tokens_are_the_joint_tokenization(model_path, monkeypatch, method, trailing):
    """Every token llama.cpp decodes, in order, starts with BOS + tokenize(context + question) -- with the
    document compressed before the question and context whitespace that ingest strips."""
    from kvmerge_local.bridge import LlamaContext

    fed: list[int] = []
    orig = LlamaContext.decode

    def spy(self, tokens, *a, **k):
        fed.extend(int(t) for t in np.asarray(tokens))
        return orig(self, tokens, *a, **k)

    monkeypatch.setattr(LlamaContext, "decode", spy)
    rec = {"id": "x", "task": "niah", "context": _context(120, 1, trailing),
           "question": "\n\nQuestion: What is the special magic word for apple?\nAnswer: The special magic word for apple is",
           "answer": "mill"}
    cfg = h.RunConfig(model=str(model_path), n_ctx=512, max_new_tokens=3, stop=None, n_threads=2)
    with h.open_session(cfg, method, 0.5) as s:
        row = h.answer(s, rec, cfg)
        want = h.expected_tokens(s.model, rec["context"], rec["question"])
        assert np.array_equal(h.fed_tokens(s.model, rec["context"], rec["question"]), want)
        n_doc = len(h.expected_tokens(s.model, rec["context"].rstrip(), ""))
    assert fed[: len(want)] == [int(t) for t in want]
    assert len(want) <= len(fed) <= len(want) + 2  # then generated tokens (the last one is never decoded)
    assert row["tokens"] == n_doc
    if method == "full":
        assert row["cells"] == n_doc
    else:  # compressed to the budget before the question, although the document fits n_ctx
        assert row["cells"] == int(np.ceil(0.5 * n_doc)) or abs(row["cells"] - 0.5 * n_doc) <= 1
        assert row["kv_bytes_now"] < row["kv_bytes_full"]


@pytest.mark.llama
def test_perplexity_scores_suffix(model_path):
    cfg = h.RunConfig(model=str(model_path), n_ctx=512, n_threads=2)
    texts = [{"id": "p", "text": _context(80, 2) + "\n\n" + _context(40, 3)}]
    rows = ppl.run(texts, ["full", "streaming_llm"], [0.5], cfg, max_suffix_tokens=32)
    assert [(r["method"], r["budget"]) for r in rows] == [("full", 1.0), ("streaming_llm", 0.5)]
    for r in rows:
        assert r["tokens"] == 31 and np.isfinite(r["ppl"]) and r["ppl"] > 1
