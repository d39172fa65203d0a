"""The quality bench's task generator (kvmerge_local.quality.tasks) and the trainer's text encoder (train/data.py;
no torch): determinism, format, answer spans."""
from __future__ import annotations

import numpy as np
import pytest

from kvmerge_local.quality import tasks
from kvmerge_local.quality.harness import load_tasks
from train import data

FILLER = [f"Paragraph {i} explains how the daemon {w} its files. It reads the settings first. Then it "
          f"starts the workers and waits for them to finish their jobs before exiting." for i, w in
          enumerate(["opens", "closes", "moves", "copies", "checks", "renames", "deletes", "links"] * 25)]


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.Corpus(train=FILLER[::2], heldout=FILLER[1::2])


def test_word_pools_are_disjoint_single_tokens():
    keys, values = data.word_pools()
    assert len(keys) > 200 and len(values) > 200 and not set(keys) & set(values)
    vocab = set(tasks._vocab_tokens()[: data.N_VOCAB])
    assert all("\u2581" + w in vocab for w in keys + values)


def test_generate_tasks_is_deterministic_and_well_formed(corpus, tmp_path):
    a = data.generate_tasks(15, seed=3, min_tokens=300, max_tokens=900, corpus=corpus)
    b = data.generate_tasks(15, seed=3, min_tokens=300, max_tokens=900, corpus=corpus)
    c = data.generate_tasks(15, seed=4, min_tokens=300, max_tokens=900, corpus=corpus)
    assert a == b and a != c
    assert {r["task"] for r in a} == set(data.TASKS)
    for r in a:
        assert set(r) >= {"id", "task", "context", "question", "answer"}
        assert r["question"].startswith("\n\nQuestion: ") and "\nAnswer: " in r["question"]
        assert r["answer"] in r["context"]  # the fact is in the context, the question comes after it
        assert r["continuation"].rstrip(".").endswith(" " + r["answer"])
        assert 0.7 * r["n_tokens"] < data.approx_tokens(r["context"] + r["question"]) < 1.3 * r["n_tokens"]
    assert load_tasks(tasks.write_jsonl(tmp_path / "t.jsonl", a)) == a


def test_training_text_spans_cover_the_continuations(corpus):
    rng = np.random.default_rng(0)
    text, spans = data.training_text(data.Assembler(corpus), rng, 800, 2.0, split="train")
    assert len(spans) >= 5
    for s, e in spans:
        assert text[s] == " " and text[e - 2: e] == ".\n"  # " value." / " chain ... value." and the stop newline
        assert text[:s].endswith((" is", " ="))


@pytest.mark.llama
def test_encode_marks_exactly_the_answer_tokens(corpus, tiny_llama_small):
    from kvmerge_local.bridge import LlamaModel

    m = LlamaModel(tiny_llama_small)
    try:
        text, spans = data.training_text(data.Assembler(corpus, data.llama_token_counter(m)),
                                         np.random.default_rng(1), 600, 2.0)
        text = "Price 1024 \u2581 " + text  # a lone space before digits is byte-fallback (3 tokens) in this vocab
        spans = [(s + 13, e + 13) for s, e in spans]
        ids, ans = data.encode(m, text, spans)
        assert ids[0] == 1
        assert (ids == m.tokenize(text, add_bos=True)).all()
        got = b"".join(m.piece(int(t)) for t in ids[ans]).decode()
        assert got == "".join(text[s:e] for s, e in spans)
    finally:
        m.close()
