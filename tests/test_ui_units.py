"""UI pieces that need neither Gradio's server nor llama.cpp: rendering, settings, uploads, the library."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from kvmerge_local.defaults import DEFAULT_MEMORY, DEFAULT_METHOD
from kvmerge_local.memory import KVStorage
from kvmerge_local.models import DOCUMENT_MODEL

from kvmerge_local.ui.choices import (AUTO, EMBEDDED, Settings, default_model_choice, embedded_model, installed_models,
                                      kv_type_choices, method_choices, model_choices)
from kvmerge_local.ui.documents import UploadError, check_upload
from kvmerge_local.ui.library import CACHE, META, Library, SavedDoc
from kvmerge_local.ui.render import citations_markdown, cited_pages, coverage, gauge_html, plot_html
from kvmerge_local.ui.workbench import _with_history


def test_importing_ui_has_no_side_effects():
    code = ("import sys, kvmerge_local.ui, kvmerge_local.ui.app, kvmerge_local.ui.render, kvmerge_local.ui.library, "
            "kvmerge_local.ui.workbench, kvmerge_local.ui.choices, kvmerge_local.ui.documents; "
            "bad = [m for m in ('llama_cpp', 'kvmerge_local.engine', 'numba') if m in sys.modules]; "
            "import threading; print(bad, threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]", "1"], out.stdout + out.stderr


def test_coverage_counts_positions_per_bin_and_page():
    # 2 layers x 2 heads; document of 100 tokens; every head keeps positions 0..49 plus junk (-1, chat 150).
    kept = np.full((2, 2, 52), -1, dtype=np.int32)
    kept[:, :, :50] = np.arange(50)
    kept[:, :, 50] = 150
    pages = [(1, 0, 49), (2, 50, 99)]
    cov = coverage(kept, 100, pages, n_bins=10)
    assert cov.n_heads == 4
    assert cov.edges[0] == 0 and cov.edges[-1] == 100
    np.testing.assert_allclose(cov.share, [1.0] * 5 + [0.0] * 5)
    assert cov.page_share == {1: 1.0, 2: 0.0}
    assert cov.mean == pytest.approx(0.5)
    assert coverage(kept, 0, pages) is None
    assert coverage(np.zeros((0, 2, 3), np.int32), 10, []) is None


def test_gauge_shows_the_numbers_a_person_needs():
    stats = {"tokens_ingested": 12345, "cells_in_use": 1024, "n_ctx": 4096, "kv_bytes_full": 100 * 2**20,
             "kv_bytes_now": 25 * 2**20, "ratio": 0.25, "t_prefill": 3.5, "t_compact": 0.25, "t_decode": 0.0,
             "method": "kvmerger", "budget": 0.25, "kv_type": "q8_0"}
    html = gauge_html(stats, doc_name="report <final>.pdf", n_pages=7)
    for needle in ("12,345", "7 pages", "1,024", "4,096", "25.0 MB", "100.0 MB", "4.0×", "3.5 s", "250 ms",
                   "kvmerger @ 25%", "q8_0", "report &lt;final&gt;.pdf"):
        assert needle in html, needle
    # Stats.ratio is now/full: used only when the byte counts are missing.
    assert "4.0×" in gauge_html({"tokens_ingested": 10, "ratio": 0.25})
    assert "No document yet" in gauge_html(None)
    assert "No document yet" in gauge_html({"tokens_ingested": 0})


def test_plot_marks_pages_and_cited_pages():
    kept = np.tile(np.arange(0, 300, 3, dtype=np.int32), (2, 2, 1))
    pages = [(1, 0, 99), (2, 100, 199), (3, 200, 299)]
    cov = coverage(kept, 300, pages)
    svg = plot_html(cov, pages, cited={2})
    assert svg.count("<svg") == 1 and "</svg>" in svg
    assert ">p1<" in svg and ">p3<" in svg and 'font-weight="bold">p2<' in svg
    assert "cited: page 2" in svg
    assert "mean 33%" in svg
    assert "appears after ingestion" in plot_html(None, [])


@pytest.mark.parametrize("text, expected", [
    ("As stated on page 2, the horn failed.", [2]),
    ("See [Page 3] and p. 1.", [3, 1]),
    ("pp. 1–3 cover it", [1, 2, 3]),
    ("pages 1 and 3", [1, 3]),
    ("page 9 does not exist; 2 is a number", []),
    ("homepage 2", []),
])
def test_cited_pages(text, expected):
    assert cited_pages(text, [(1, 0, 9), (2, 10, 19), (3, 20, 29)]) == expected


def test_citations_markdown_reports_span_and_share():
    kept = np.tile(np.arange(0, 10, dtype=np.int32), (1, 1, 1))
    pages = [(1, 0, 9), (2, 10, 19)]
    md = citations_markdown([2, 1], pages, coverage(kept, 20, pages))
    assert md.splitlines() == ["- page 2: tokens 10–19, 0% held in the cache",
                               "- page 1: tokens 0–9, 100% held in the cache"]


def test_settings_from_ui_and_fingerprint():
    s = Settings.from_ui(EMBEDDED, DEFAULT_METHOD, 0.5, "f16", "2048")
    assert s == Settings(model=None, method=DEFAULT_METHOD, budget=0.5, kv_type="f16", n_ctx=2048)
    assert s.open_kwargs() == {"n_ctx": 2048, "kv_type": "f16", "method": DEFAULT_METHOD, "budget": 0.5}
    assert s.fingerprint() == Settings(budget=0.5, kv_type="f16").fingerprint()
    assert s.fingerprint() != Settings(budget=0.25, kv_type="f16").fingerprint()
    assert "embedded default" in s.describe() and "@ 50% · f16" in s.describe()
    # the default: a memory budget (the slider is then a share of the f16 cache's bytes)
    auto = Settings()
    assert (auto.kv_type, auto.budget) == (AUTO, DEFAULT_MEMORY)
    assert auto.open_kwargs() == {"n_ctx": 2048, "method": DEFAULT_METHOD, "memory": DEFAULT_MEMORY}
    assert f"@ {DEFAULT_MEMORY:.0%} memory · auto" in auto.describe()
    assert Settings.from_ui(EMBEDDED, "h2o", 0.5, "q8_0/q4_0", 1024).open_kwargs()["kv_type"] == "q8_0/q4_0"
    with pytest.raises(ValueError, match="unknown cache type 'q3'"):
        Settings(kv_type="q3")
    assert Settings.from_ui("/m/llama.gguf", "h2o", 1, "q8_0", 4096).describe().endswith("llama.gguf")


def test_pickers_offer_the_registry_and_the_bridge_types():
    from kvmerge_local.bridge.context import KV_TYPES
    from kvmerge_local.methods import REGISTRY

    methods = [v for _, v in method_choices()]
    assert methods[0] == DEFAULT_METHOD and sorted(methods) == sorted(REGISTRY)
    kv = [v for _, v in kv_type_choices()]
    assert kv[:2] == [AUTO, "f16"] and set(KV_TYPES) <= set(kv) and "q8_0/q4_0" in kv
    assert all(KVStorage.parse(v) for v in kv if v != AUTO)
    models = model_choices("/some/where/model.gguf")
    assert ("model.gguf", "/some/where/model.gguf") in models
    # the real document model first (preselected when --model is absent), offered even before it is pulled;
    # the embedded tiny model and installed models.txt entries stay choosable
    assert models[0][1] == DOCUMENT_MODEL and default_model_choice(None) == DOCUMENT_MODEL
    assert default_model_choice("/m/x.gguf") == "/m/x.gguf"
    assert (EMBEDDED in {v for _, v in models}) == (embedded_model() is not None)
    assert set(installed_models()) <= {v for _, v in model_choices(None)}


def test_check_upload_refuses_with_clear_messages(tmp_path):
    ok = tmp_path / "a.md"
    ok.write_text("# hello")
    assert check_upload(ok) == ok
    (tmp_path / "b.docx").write_bytes(b"PK")
    with pytest.raises(UploadError, match="unsupported file type .docx"):
        check_upload(tmp_path / "b.docx")
    (tmp_path / "c.txt").write_bytes(b"")
    with pytest.raises(UploadError, match="empty"):
        check_upload(tmp_path / "c.txt")
    big = tmp_path / "d.txt"
    big.write_bytes(b"x" * 300_000)
    with pytest.raises(UploadError, match=r"0\.3 MB, over the 0\.25 MB upload limit"):
        check_upload(big, max_mb=0.25)
    with pytest.raises(UploadError, match="report.txt: the upload did not arrive"):
        check_upload(tmp_path / "gone.txt", display_name="report.txt")


def test_library_lists_complete_entries_newest_first(tmp_path):
    lib = Library(tmp_path / "docs")
    assert lib.list() == []  # no folder yet: nothing created by listing
    assert not (tmp_path / "docs").exists()
    from kvmerge_local.engine.saved import write_saved

    for i, name in enumerate(["old.pdf", "new.txt"]):
        s = Settings(budget=0.5 - 0.25 * i)
        # meta.json's stats and pages are stale on purpose: the list reads them from the cache file's header
        doc = SavedDoc(key=Library.key_for(f"{i}" * 64, s), name=name, digest=f"{i}" * 64, settings=s,
                       created=time.time() + i, stats={"tokens_ingested": 7}, pages=[(9, 9, 9)])
        doc.folder = lib.root / doc.key
        doc.folder.mkdir(parents=True)
        cells = np.zeros((1, 1, 3), np.int32)
        write_saved(doc.folder / CACHE, {"document": {"name": name, "n_tokens": 100 * (i + 1), "pages": [[1, 0, 9]]},
                                         "stats": {"tokens_ingested": 100 * (i + 1)}},
                    {"blob": np.zeros(4, np.uint8), "doc_pos": cells, "rope_pos": cells,
                     "evidence": cells.astype(np.float32)})
        (doc.folder / META).write_text(json.dumps(doc.to_json()))
    (lib.root / "half-saved").mkdir()
    (lib.root / "half-saved" / CACHE).write_bytes(b"x")
    (lib.root / "corrupt").mkdir()
    (lib.root / "corrupt" / META).write_text("{not json")
    bad = json.loads((doc.folder / META).read_text()) | {"key": "bad-cache"}
    (lib.root / "bad-cache").mkdir()
    (lib.root / "bad-cache" / CACHE).write_bytes(b"not a cache")  # meta.json fine, cache unreadable: not listed
    (lib.root / "bad-cache" / META).write_text(json.dumps(bad))
    listed = lib.list()
    assert [d.name for d in listed] == ["new.txt", "old.pdf"]
    assert listed[1].pages == [(1, 0, 9)] and listed[1].settings == Settings(budget=0.5)
    assert listed[0].stats == {"tokens_ingested": 200} and listed[1].stats == {"tokens_ingested": 100}
    assert "200 tokens" in listed[0].label() and f"{DEFAULT_METHOD} @ 25%" in listed[0].label()
    assert lib.find("1" * 64, Settings(budget=0.25)).name == "new.txt"
    assert lib.find("1" * 64, Settings(budget=0.5)) is None
    assert lib.get("../etc") is None
    assert lib.remove(listed[0].key) and [d.name for d in lib.list()] == ["old.pdf"]
    assert not lib.remove("nope")


def test_docs_root_follows_the_environment(tmp_path, monkeypatch):
    from kvmerge_local.ui.library import docs_root

    monkeypatch.setenv("KVMERGE_DOCS", str(tmp_path / "elsewhere"))
    assert docs_root() == tmp_path / "elsewhere" and Library().root == tmp_path / "elsewhere"
    monkeypatch.delenv("KVMERGE_DOCS")
    assert docs_root().parts[-3:] == (".cache", "kvmerge-local", "docs")


def test_history_is_carried_when_the_session_lost_it():
    assert _with_history("Why?", []) == "Why?"
    q = _with_history("And then?", [("Who?", "Mara."), ("Where?", "")])
    assert q == "Earlier in this conversation:\nQ: Who?\nA: Mara.\n\nNow: And then?"


def test_chat_messages_carry_page_citations_apart_from_the_answer():
    from kvmerge_local.ui.app import _messages

    turns = [{"q": "Who?", "a": "Mara, see page 2.", "cited": [2], "cite": "- page 2: tokens 10–19"},
             {"q": "Why?", "a": "", "cited": [], "cite": ""}]
    msgs = _messages(turns)
    assert [m["role"] for m in msgs] == ["user", "assistant", "assistant", "user", "assistant"]
    assert msgs[2]["metadata"] == {"title": "Pages cited: 2"} and msgs[2]["content"].startswith("- page 2")
    assert msgs[4]["content"] == "…"  # an answer still on its way
