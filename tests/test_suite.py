"""The real-model suite: document generator, scoring, aggregates, and on SmolLM2 a compressed cache that keeps
needles the full cache answers."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

from kvmerge_local.quality import ruler, suite, suite_report
from kvmerge_local.quality.harness import BenchError, make_method
from kvmerge_local.quality.suite_cli import read_documents


def _count(text: str) -> int:
    return len(text) // 4


def test_generator_places_every_answer_at_its_depth_and_length():
    docs = ruler.generate(6, [600, 1200], 5, _count)
    assert {d["task"] for d in docs} == set(ruler.TASKS)
    assert {d["shape"] for d in docs if d["task"] == "niah_single"} == {"number", "uuid", "word"}
    for d in docs:
        ctx = d["context"]
        for q in d["questions"]:
            for a in q["answer"]:
                assert a in ctx, (d["id"], a)
                if q["shape"] == "number":
                    assert re.fullmatch(r"[1-9]\d{6}", a)
                if q["shape"] == "uuid":
                    assert str(uuid.UUID(a)) == a
        if d["task"] != "common_words":
            assert abs(_count(ctx) - d["n_tokens"]) < 0.15 * d["n_tokens"], d["id"]
        if d["task"] == "niah_multiquery":
            depths = [q["depth"] for q in d["questions"]]
            assert [int(x * 4) for x in depths] == [0, 1, 2, 3]
            offs = [ctx.index(q["answer"][0]) for q in d["questions"]]
            assert offs == sorted(offs)  # a deeper needle sits later in the document
    assert ruler.generate(6, [600, 1200], 5, _count) == docs
    assert ruler.generate(6, [600, 1200], 6, _count) != docs


_GEN = ("import hashlib, json, sys; from kvmerge_local.quality import ruler; "
        "print(hashlib.sha256(json.dumps(ruler.generate(2, [600], 5, lambda t: len(t) // 4)).encode()).hexdigest())")


def test_generator_does_not_depend_on_the_hash_seed():
    """The documents are a function of the seed alone: string hashing (set order) is randomised per process."""
    digests = {subprocess.run([sys.executable, "-c", _GEN], env={**os.environ, "PYTHONHASHSEED": hs},
                              capture_output=True, text=True, check=True).stdout for hs in ("1", "2", "3")}
    assert len(digests) == 1, digests


def test_score_all_matches_whole_answers_only():
    assert ruler.score_all("It is 1234567.", ["1234567"]) == 1.0
    assert ruler.score_all("It is 12345678.", ["1234567"]) == 0.0
    assert ruler.score_all("cat, Dog and emu", ["dog", "cat", "yak", "emu"]) == 0.75


def test_aggregate_retention_is_method_over_full_on_the_same_questions():
    rows = []
    for d in range(10):
        for q in range(2):
            full = 1.0 if (d + q) % 2 == 0 else 0.0
            base = {"doc": f"d{d}", "q": q, "task": "t", "shape": "number", "depth": 0.1 * d, "cells": 1,
                    "tokens": 2, "t_compact": 0.0}
            rows.append({**base, "method": "full", "budget": 1.0, "score": full})
            rows.append({**base, "method": "m", "budget": 0.5, "score": full if d < 5 else 0.0})
    agg = {(r["method"], r["budget"]): r for r in suite_report.aggregate(rows)["overall"]}
    m = agg[("m", 0.5)]
    assert m["full"] == pytest.approx(0.5) and m["acc"] == pytest.approx(0.25)
    assert m["retention"] == pytest.approx(0.5)
    assert m["acc_lo"] <= m["acc"] <= m["acc_hi"] and m["ret_lo"] <= m["retention"] <= m["ret_hi"]
    assert agg[("full", 1.0)]["retention"] == pytest.approx(1.0)
    depth = {r["depth"]: r for r in suite_report.aggregate(rows)["by"]["depth"] if r["method"] == "m"}
    assert depth["start"]["retention"] == pytest.approx(1.0) and depth["end"]["acc"] == 0.0


def test_read_documents_names_the_bad_line(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text('{"context": "x", "questions": [{"question": "q", "answer": ["a"]}]}\n{"context": "y"}\n')
    with pytest.raises(BenchError, match=r"docs.jsonl:2"):
        read_documents(p)


# ------------------------------------------------------------------------------------------ real model
@pytest.fixture(scope="module")
def smollm2():
    from kvmerge_local.errors import ModelError
    from kvmerge_local.models import default_document_model

    try:
        path = default_document_model()
    except ModelError as exc:
        pytest.skip(f"the real document model is not set up ({exc})")
    from kvmerge_local.engine import Session

    with Session.open(path, n_ctx=1536, n_threads=2) as s:
        yield s


def _needle(session, seed: int, shape: str) -> dict:
    docs = ruler.generate(3, [768], seed, lambda t: len(session.model.tokenize(t)), tasks=("niah_single",))
    return next(d for d in docs if d["shape"] == shape)


CONFIGS = [("full", make_method("full"), 1.0), ("kvzip", make_method("kvzip"), 0.5)]


# On 8 seeds (768-token single needles) KVzip at 50% keeps 6 of the 8 numbers and 3 of the 6 UUIDs the full cache
# answers; the cases below are kept ones (the product's promise, tested) and one recorded loss of each kind.
@pytest.mark.llama
@pytest.mark.parametrize("seed,shape", [(1, "number"), (3, "number"), (1, "word"), (1, "uuid"), (3, "uuid")])
def test_compressed_cache_keeps_a_needle_the_full_cache_answers(smollm2, seed, shape):
    rows = {r["method"]: r for r in suite.run_document(smollm2, _needle(smollm2, seed, shape), CONFIGS, suite.SuiteConfig())}
    assert rows["full"]["score"] == 1.0, rows["full"]["output"]
    assert rows["kvzip"]["cells"] == round(0.5 * rows["kvzip"]["tokens"])
    assert rows["kvzip"]["score"] == 1.0, rows["kvzip"]["output"]


@pytest.mark.llama
@pytest.mark.xfail(strict=True, reason="known gap: KVzip at 50% loses some needles the full cache answers on "
                                       "SmolLM2 (seed 2's UUID, seed 7's number)")
@pytest.mark.parametrize("seed,shape", [(2, "uuid"), (7, "number")])
def test_compressed_cache_loses_some_needles(smollm2, seed, shape):
    rows = {r["method"]: r for r in suite.run_document(smollm2, _needle(smollm2, seed, shape), CONFIGS, suite.SuiteConfig())}
    assert rows["full"]["score"] == 1.0
    assert rows["kvzip"]["score"] == 1.0


@pytest.mark.llama
def test_a_document_longer_than_the_context_is_refused_not_misread(smollm2):
    """The suite compares every method with the full cache, so a document must fit uncompressed: a longer one
    is a clear error (before, the window re-decode ran on a cache the ingest had already compacted)."""
    doc = ruler.generate(1, [2200], 7, lambda t: len(smollm2.model.tokenize(t)), tasks=("niah_single",))[0]
    with pytest.raises(BenchError, match="does not fit n_ctx 1536 uncompressed"):
        suite.prepare(smollm2, doc["context"], need_replay=False)


def test_teacher_forced_aggregates_are_paired_differences_and_ratios():
    rows = []
    for d in range(8):
        for q in range(2):
            base = {"doc": f"d{d}", "q": q, "task": "t", "shape": "number", "depth": 0.5, "cells": 1, "tokens": 2,
                    "t_compact": 0.0, "score": 0.0}
            rows.append({**base, "method": "full", "budget": 1.0, "nll": 0.1 * d, "tok_acc": 1.0})
            rows.append({**base, "method": "m", "budget": 0.5, "nll": 0.1 * d + (0.5 if q else 0.0),
                         "tok_acc": 0.5 if q else 1.0})
    agg = {(r["method"], r["budget"]): r for r in suite_report.aggregate(rows)["overall"]}
    m = agg[("m", 0.5)]
    assert m["dnll"] == pytest.approx(0.25) and m["dnll_lo"] <= 0.25 <= m["dnll_hi"]
    assert m["tok_ret"] == pytest.approx(0.75) and m["tok_full"] == pytest.approx(1.0)
    assert agg[("full", 1.0)]["dnll"] == 0.0 and agg[("full", 1.0)]["dnll_hi"] == 0.0
    md = suite_report.markdown(suite_report.aggregate(rows), {"model": "x"})
    assert "| m | 0.5 | 0.250 (" in md
    by_task = {r["method"]: r for r in suite_report.aggregate(rows)["by"]["task"]}
    assert by_task["m"]["tok_ret"] == pytest.approx(0.75) and "## Token retention by depth" in md
    # rows without the measures (older result files) aggregate as before, without the table
    old = [{k: v for k, v in r.items() if k not in ("nll", "tok_acc")} for r in rows]
    assert "dnll" not in suite_report.aggregate(old)["overall"][0]
    assert "Teacher-forced" not in suite_report.markdown(suite_report.aggregate(old), {"model": "x"})


@pytest.mark.llama
def test_answer_logprob_matches_a_token_by_token_decode_and_leaves_the_cache(smollm2):
    """The batch teacher-forced score equals -log softmax read one decode at a time (another llama.cpp path),
    and the session's cache is as before."""
    doc = _needle(smollm2, 1, "number")
    suite.prepare(smollm2, doc["context"], need_replay=False)
    q, cfg = doc["questions"][0], suite.SuiteConfig(prompt="raw")
    n0 = smollm2.ctx.n_past
    nll, tok_acc = suite.answer_logprob(smollm2, q, cfg)
    assert smollm2.ctx.n_past == n0
    question = " " + q["question"]
    t_q = smollm2.chat.question(question, raw=True)[0]
    t_qa = smollm2.chat.question(question + " " + ", ".join(q["answer"]), raw=True)[0]
    assert np.array_equal(t_qa[:len(t_q)], t_q)
    lps, hits = [], []
    try:
        logits = smollm2.ctx.decode(t_q, logits="last")
        for t in t_qa[len(t_q):]:
            z = logits.astype(np.float64)
            lps.append(z[t] - (np.log(np.exp(z - z.max()).sum()) + z.max()))
            hits.append(int(np.argmax(z)) == int(t))
            logits = smollm2.ctx.decode(np.array([t], np.int32), logits="last")
    finally:
        smollm2.bridge.remove_from(n0)
    assert nll == pytest.approx(-np.mean(lps), abs=2e-2)
    assert tok_acc == pytest.approx(np.mean(hits))


def test_memory_runs_group_methods_by_the_planned_storage_and_relabel_their_rows():
    """``bench --memory``: one run per storage the plans need; a plan that keeps every cell runs full alone;
    rows come back as METHOD@TYPES at the memory budget, with the cell budget they ran at."""
    from kvmerge_local.memory import MemoryPlan
    from kvmerge_local.quality.suite_cli import memory_runs, relabel

    keep_all, evict = MemoryPlan.for_fraction(0.5), MemoryPlan.for_fraction(0.2)
    assert keep_all.budget.value == 1.0 and evict.budget.value < 1.0
    runs = {kv: (confs, labels) for kv, confs, labels in memory_runs(["full", "kvzip", "snapkv"], [0.5, 0.2], 64)}
    want = {keep_all.storage.name: [("full", 1.0)]}
    want.setdefault(evict.storage.name, []).extend([("kvzip", evict.budget.value), ("snapkv", evict.budget.value)])
    assert {kv: [(n, b) for n, _, b in confs] for kv, (confs, _) in runs.items()} == want
    confs, labels = runs[evict.storage.name]
    row = {"doc": "d", "q": 0, "method": "kvzip", "budget": evict.budget.value, "score": 1.0}
    out = relabel([row], labels)
    assert out == [{**row, "method": f"kvzip@{evict.storage.name}", "budget": 0.2, "cell_budget": evict.budget.value}]
    assert relabel([row], None) == [row]
    only_f16 = memory_runs(["kvzip"], [0.3], 48)  # rows of 48 cannot be quantized: f16, 30% of the cells
    assert [(kv, [(n, b) for n, _, b in c]) for kv, c, _ in only_f16] == [("f16", [("kvzip", 0.3)])]


@pytest.mark.parametrize("extra", [["--kv-type", "q8_0"], ["--ppl", "x.jsonl"]])
def test_memory_budgets_refuse_a_cache_type_or_perplexity(tmp_path, capsys, extra):
    from kvmerge_local.quality.suite_cli import main

    assert main(["--memory", "0.5", "--out", str(tmp_path / "o"), *extra]) == 2
    assert "--memory picks the cache types itself" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def smollm2_default_memory(smollm2):
    """SmolLM2 on the cache types the default memory plan picks (a second context; the f16 one stays)."""
    from kvmerge_local.defaults import DEFAULT_MEMORY
    from kvmerge_local.engine import Session

    with Session.open(smollm2.model.path, n_ctx=1536, n_threads=2, memory=DEFAULT_MEMORY) as s:
        yield s


# The product's default (README, "Memory, not cells"): the same needles as above at a quarter of the f16 cache's
# bytes (4-bit cache, KVzip evicting 11% of the cells), the two that KVzip loses at 50% of the f16 cells included.
# Seed 7's number is kept; two UUIDs are lost, as recorded below (strict).  The 4-bit cache alone keeps all seven,
# so the losses come from the eviction on top of it (`q8_0/q4_0` keeping 62% loses only seed 2's).
_UUID_GAP = pytest.mark.xfail(strict=True, reason="known gap: this UUID is lost at the default memory budget "
                                                  "(the greedy answer drifts after ~20 correct characters)")


@pytest.mark.llama
@pytest.mark.parametrize("seed,shape", [(1, "number"), (3, "number"), (7, "number"), (1, "word"), (1, "uuid"),
                                        pytest.param(2, "uuid", marks=_UUID_GAP),
                                        pytest.param(3, "uuid", marks=_UUID_GAP)])
def test_default_memory_budget_keeps_the_needles_the_f16_full_cache_answers(smollm2, smollm2_default_memory,
                                                                              seed, shape):
    from kvmerge_local.defaults import DEFAULT_MEMORY, DEFAULT_METHOD

    s = smollm2_default_memory
    doc = _needle(smollm2, seed, shape)
    full = suite.run_document(smollm2, doc, CONFIGS[:1], suite.SuiteConfig())[0]
    assert full["score"] == 1.0, full["output"]
    cells = s.budget.value
    row = suite.run_document(s, doc, [(DEFAULT_METHOD, make_method(DEFAULT_METHOD), cells)], suite.SuiteConfig())[0]
    memory = row["cells"] * s.bytes_per_cell / (row["tokens"] * smollm2.bytes_per_cell)
    assert memory == pytest.approx(DEFAULT_MEMORY, abs=0.002) and row["cells"] < row["tokens"]
    assert row["score"] == 1.0, row["output"]
