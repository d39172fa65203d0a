"""The kvmerge-local command line on tiny models."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from kvmerge_local.cli import main
from kvmerge_local.defaults import DEFAULT_METHOD

DOC_TEXT = "The bridge over the Arn river was finished in 1902. It is made of grey stone. " * 30


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory(vocab="llama2-small", n_vocab=4096, n_ctx_train=512)


@pytest.mark.llama
def test_ask_json_prints_one_object(model_path, tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC_TEXT)
    rc = main(["ask", "--model", str(model_path), "--doc", str(doc), "--question", "When was it finished?",
               "--n-ctx", "256", "--budget", "0.5", "--max-new-tokens", "6", "--threads", "2", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    obj = json.loads(out)  # exactly one JSON object on stdout
    assert isinstance(obj["answer"], str)
    st = obj["stats"]
    for key in ("tokens_ingested", "cells_in_use", "kv_bytes_full", "kv_bytes_now", "ratio", "t_prefill",
                "t_compact", "t_decode", "method", "budget"):
        assert key in st
    assert st["method"] == DEFAULT_METHOD and st["tokens_ingested"] > 256 and st["cells_in_use"] <= 256


@pytest.mark.llama
def test_ask_plain_and_bad_inputs(model_path, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC_TEXT[:400])
    assert main(["ask", "--model", str(model_path), "--doc", str(doc), "-q", "Stone?", "--n-ctx", "256",
                 "--max-new-tokens", "3", "--quiet", "--method", "snapkv", "--budget", "64"]) == 0
    cap = capsys.readouterr()
    assert "cells" in cap.err
    assert main(["ask", "--model", str(model_path), "--doc", str(tmp_path / "nope.pdf"), "-q", "x"]) == 2
    assert "document not found" in capsys.readouterr().err
    assert main(["ask", "--model", str(tmp_path / "nope.gguf"), "--doc", str(doc), "-q", "x"]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["ask", "--model", str(model_path), "--doc", str(doc), "-q", "x", "--method", "zip"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_models_methods_bench_ui(capsys, monkeypatch):
    assert main(["models"]) == 0
    assert "llama-2-7b-chat-q4_k_m" in capsys.readouterr().out
    assert main(["models", "--json"]) == 0
    assert any(e["name"].startswith("mistral") for e in json.loads(capsys.readouterr().out))
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "kvmerger" in out and "cam+h2o" in out
    assert main(["methods", "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} >= {"full", "kvmerger"}
    monkeypatch.setitem(sys.modules, "kvmerge_local.quality", None)
    monkeypatch.setitem(sys.modules, "kvmerge_local.quality.cli", None)  # also when another test imported it
    assert main(["bench", "--help-me"]) == 2
    assert "not available yet" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "kvmerge_local.ui.app", None)
    assert main(["ui"]) == 2
    assert "web UI is not available" in capsys.readouterr().err


@pytest.mark.llama
def test_chat_reads_stdin(model_path, tmp_path, capsys, monkeypatch):
    import io

    doc = tmp_path / "doc.txt"
    doc.write_text(DOC_TEXT[:300])
    monkeypatch.setattr(sys, "stdin", io.StringIO("What?\n/stats\n/reset\n/quit\n"))
    assert main(["chat", "--model", str(model_path), "--doc", str(doc), "--n-ctx", "256", "--max-new-tokens", "3",
                 "--quiet"]) == 0
    assert capsys.readouterr().out.count("tokens ->") >= 2


@pytest.mark.llama
def test_demo_runs_on_the_document_model(capsys):
    """`make demo`: SmolLM2-135M-Instruct (skipped only when it is not downloaded; `make setup` pulls it)
    answers the sample PDF's question through its chat template from a cache at the default memory budget
    (q8_0/q4_0, the cells it leaves room for), citing page 2."""
    from kvmerge_local.defaults import DEFAULT_MEMORY
    from kvmerge_local.memory import MemoryPlan
    from kvmerge_local.models import DOCUMENT_MODEL, get_entry

    if not get_entry(DOCUMENT_MODEL).local_path.is_file():
        pytest.skip(f"{DOCUMENT_MODEL} is not downloaded (`make setup`)")
    assert main(["demo", "--quiet", "--n-ctx", "1024", "--max-new-tokens", "24", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["model"].startswith(f"{DOCUMENT_MODEL} (") and "chat format gguf" in lines["model"]
    assert lines["document"].startswith("sample.pdf, 3 pages")
    assert lines["question"] == "What is the special magic word for water?"
    assert "mill" in lines["answer"].lower()
    assert lines["cited"].startswith("page 2 (tokens ")
    assert lines["expected"].endswith("correct") and "NOT" not in lines["expected"]
    before, after = (int(lines[k].split()[0]) for k in ("cache before compression", "cache after compression"))
    plan = MemoryPlan.for_fraction(DEFAULT_MEMORY)
    assert after == round(plan.budget.value * before) and lines["cache after compression"].split(" (")[1].startswith(
        f"{plan.storage}, ")
    assert f"{100 * DEFAULT_MEMORY:.0f}% of the f16 cache's memory" in lines["cache after compression"]


def test_demo_without_the_document_model_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVMERGE_MODELS", str(tmp_path))
    assert main(["demo", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "make setup" in err and "kvmerge-local pull smollm2-135m-instruct" in err and "not downloaded" in err


@pytest.mark.llama
def test_demo_on_a_raw_model_uses_its_prompt_layout(capsys):
    """`demo --model`: the embedded kvmerge-tiny (no chat template) gets the question in its trained layout."""
    from kvmerge_local.models import default_model

    assert main(["demo", "--model", str(default_model()), "--quiet", "--n-ctx", "1024", "--max-new-tokens", "4",
                 "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "chat format raw" in out and "answer: The special magic word for water is" in out and "saved" in out


def test_answer_pages_finds_where_the_answer_words_come_from():
    from kvmerge_local.cli import answer_pages, page_share

    text = "[Page 1]\nThe lake is 41 metres deep.\n[Page 2]\nThe magic word is mill.\n[Page 3]\nMill Road, 41 metres."
    pages = [(1, 0, 36), (2, 37, 69), (3, 70, len(text))]
    assert [text[a:b].split("\n")[1] for _, a, b in pages] == ["The lake is 41 metres deep.", "The magic word is mill.",
                                                               "Mill Road, 41 metres."]
    assert answer_pages("The magic word is mill.", text, pages) == [2]
    assert answer_pages("It is 41 metres deep", text, pages) == [1]
    assert answer_pages("41 metres", text, pages) == [1, 3]  # a tie cites both
    assert answer_pages("I do not know", text, pages) == []
    kept = np.array([[[0, 1, 2, 9]], [[0, 5, 6, 7]]])  # 2 layers x 1 head: tokens 0-3 held 4 times of 8
    assert page_share(kept, 0, 3) == 4 / 8 and page_share(kept, 5, 7) == 3 / 6
