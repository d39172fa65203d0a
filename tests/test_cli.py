"""The kvmerge-local command line on tiny models."""
from __future__ import annotations

import json
import sys

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
    monkeypatch.setitem(sys.modules, "kvmerge_local.bench", None)
    monkeypatch.setitem(sys.modules, "kvmerge_local.bench.cli", None)  # also when another test imported it
    assert main(["bench", "--help-me"]) == 2
    assert "not available yet" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ui.app", None)
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
def test_demo_runs(capsys):
    """The demo runs on the embedded model when it is there, else on a tiny random model it says is one."""
    from kvmerge_local.errors import ModelError
    from kvmerge_local.models import default_model

    try:
        default_model()
        embedded = True
    except ModelError:
        embedded = False
    assert main(["demo", "--quiet", "--n-ctx", "1024", "--max-new-tokens", "8", "--threads", "2"]) == 0
    cap = capsys.readouterr()
    assert "sample.pdf, 3 pages" in cap.out and "saved" in cap.out
    if embedded:
        assert "answer:" in cap.out and "meaningless" not in cap.err + cap.out
    else:
        assert "meaningless" in cap.err + cap.out
