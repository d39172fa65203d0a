"""``kvmerge-local bench`` end to end on a tiny model: the files it writes, the scores in them, bad arguments."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvmerge_local.quality import harness as h
from kvmerge_local.quality.cli import main as bench_main
from kvmerge_local.cli import main as top_main

WORDS = "the river runs north past the stone house where light falls on paper and old mill".split()


def _ctx(seed: int, n: int = 90) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n)) + ". The special magic word for apple is mill. " + \
        " ".join(rng.choice(WORDS, n)) + "."


Q = "\n\nQuestion: What is the special magic word for apple?\nAnswer: The special magic word for apple is"


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory(vocab="llama2-small", n_vocab=4096, n_ctx_train=512)


@pytest.fixture()
def task_file(tmp_path):
    recs = [{"id": f"t{i}", "task": ["niah", "niah", "qa"][i], "context": _ctx(i), "question": Q,
             "answer": "mill", "extra": 1} for i in range(3)]
    p = tmp_path / "tasks.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


@pytest.mark.llama
def test_bench_writes_results(model_path, task_file, tmp_path, capsys):
    out = tmp_path / "out"
    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text(json.dumps({"id": "p", "text": _ctx(5) + "\n\n" + _ctx(6, 30)}) + "\n")
    rc = top_main(["bench", "--model", str(model_path), "--tasks", str(task_file), "--methods", "full,h2o,kvmerger",
                   "--budgets", "0.5", "--n-ctx", "512", "--max-new-tokens", "4", "--threads", "2", "--quiet",
                   "--ppl", str(ppl), "--ppl-suffix-tokens", "16", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    for name in ("results.json", "results.md", "accuracy_vs_budget.png", "compaction_time.png",
                 "perplexity_vs_budget.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    runs, agg = res["runs"], res["results"]
    assert len(runs) == 3 * 3  # full once + 2 methods x 1 budget, 3 tasks each
    assert {(r["method"], r["budget"]) for r in runs} == {("full", 1.0), ("h2o", 0.5), ("kvmerger", 0.5)}
    for r in runs:  # scores are recomputed from the output exactly as specified
        assert (r["contains"], r["exact"]) == h.score(r["output"], r["answer"])
        assert "\n" not in r["output"].lstrip()  # stopped at the answer line
    keys = {(a["method"], a["budget"], a["task"]) for a in agg}
    assert keys == {(m, b, t) for m, b in [("full", 1.0), ("h2o", 0.5), ("kvmerger", 0.5)] for t in ("all", "niah", "qa")}
    for a in agg:
        mine = [r for r in runs if (r["method"], r["budget"]) == (a["method"], a["budget"])
                and a["task"] in ("all", r["task"])]
        assert a["n"] == len(mine) == (3 if a["task"] == "all" else 2 if a["task"] == "niah" else 1)
        assert a["accuracy"] == pytest.approx(np.mean([r["contains"] for r in mine]), abs=1e-4)
        assert a["exact"] == pytest.approx(np.mean([r["exact"] for r in mine]), abs=1e-4)
        for k in ("t_prefill", "t_compact", "t_decode", "cells", "kv_bytes", "kv_bytes_full"):
            assert a[k] >= 0
        if a["method"] == "full":
            assert a["cells"] == a["tokens"] and a["kv_bytes"] == a["kv_bytes_full"] and a["t_compact"] == 0
        else:  # compressed to the budget although the documents fit n_ctx
            assert a["cells"] == pytest.approx(0.5 * a["tokens"], abs=1) and a["kv_bytes"] < a["kv_bytes_full"]
    assert [(p["method"], p["budget"]) for p in res["perplexity"]] == [("full", 1.0), ("h2o", 0.5), ("kvmerger", 0.5)]
    md = (out / "results.md").read_text()
    assert "| full | 1 |" in md and "| kvmerger | 0.5 |" in md and "niah" in md and "ppl" in md
    assert res["meta"]["n_ctx"] == 512


@pytest.mark.parametrize("args,msg", [
    (["--methods", "full,nope"], "unknown method 'nope'"),
    (["--budgets", "0.5,1.5"], "out of range"),
    (["--budgets", "half"], "not a number"),
    (["--limit", "0"], "--limit must be >= 1"),
])
def test_bench_bad_arguments(task_file, tmp_path, capsys, args, msg):
    rc = bench_main(["--tasks", str(task_file), "--out", str(tmp_path / "o"), "--quiet"] + args)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err
    assert not (tmp_path / "o").exists()


def test_bench_bad_task_files(tmp_path, capsys):
    rc = bench_main(["--tasks", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "task file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "task": "t", "context": "c", "question": "q", "answer": "a"}) + "\n{oops\n")
    rc = bench_main(["--tasks", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2: not valid JSON" in err
    rc = bench_main(["--tasks", str(bad), "--ppl", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2


def test_bench_requires_tasks_and_out(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--methods", "full"])
    assert e.value.code == 2
    assert "--tasks" in capsys.readouterr().err
