"""models.txt parsing, model resolution and `pull` against a loopback HTTP server."""
from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from kvmerge_local import models
from kvmerge_local.errors import KVMergeError, ModelError

REPO_TXT = Path(__file__).resolve().parent.parent / "models.txt"


def test_repository_registry_is_honest():
    reg = models.load_registry(REPO_TXT)
    names = set(reg)
    for size in ("7b", "13b"):
        for q in ("q4_k_m", "q5_k_m", "q8_0"):
            assert f"llama-2-{size}-chat-{q}" in names
    assert any(n.startswith("mistral-7b-instruct") for n in names)
    for e in reg.values():
        assert e.sha256 == models.UNVERIFIED  # nothing could be checked from here: never invented
        assert "sha256" in e.unverified_fields and "repo" in e.unverified_fields
        assert e.url.startswith("https://huggingface.co/") and "?" not in e.url
    assert reg["llama-2-7b-chat-q4_k_m"].value(reg["llama-2-7b-chat-q4_k_m"].n_ctx_train) == "4096"


def test_bad_registry_lines(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("a b c\n")
    with pytest.raises(ModelError, match="expected 7 fields"):
        models.load_registry(p)
    p.write_text("a r f deadbeef 1 raw 1\n")
    with pytest.raises(ModelError, match="64 hex"):
        models.load_registry(p)
    with pytest.raises(ModelError, match="not found"):
        models.load_registry(tmp_path / "nope.txt")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    f = root / "org" / "repo" / "resolve" / "main" / "model.gguf"
    f.parent.mkdir(parents=True)
    data = bytes(range(256)) * 4096 + b"tail"
    f.write_bytes(data)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.sha256(data).hexdigest(), data
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)


def _registry(tmp_path, sha):
    p = tmp_path / "models.txt"
    p.write_text(f"# test\ngood org/repo model.gguf {sha} 1048580 raw 512\n"
                 f"bad org/repo model.gguf {'0' * 64} unverified raw 512\n"
                 "unk org/repo model.gguf unverified unverified raw? 512?\n"
                 "gone org/repo missing.gguf unverified unverified raw 512\n")
    return p


def test_pull_from_loopback(server, tmp_path, monkeypatch, capsys):
    base, sha, data = server
    monkeypatch.setenv("KVMERGE_HF_BASE", base)
    monkeypatch.setenv("KVMERGE_MODELS", str(tmp_path / "dl"))
    reg = _registry(tmp_path, sha)
    path = models.pull("good", registry=reg, progress=True, timeout=10)
    assert path == tmp_path / "dl" / "model.gguf" and path.read_bytes() == data
    assert models.file_sha256(path) == sha
    with pytest.raises(KVMergeError, match="sha256 mismatch"):
        models.pull("bad", dest=tmp_path / "d2", registry=reg, progress=False, timeout=10)
    assert not list((tmp_path / "d2").iterdir())  # the bad download was removed
    assert models.pull("unk", dest=tmp_path / "d3", registry=reg, progress=False, timeout=10).is_file()
    with pytest.raises(KVMergeError, match="download of gone"):
        models.pull("gone", dest=tmp_path / "d4", registry=reg, progress=False, timeout=10)
    with pytest.raises(ModelError, match="unknown model"):
        models.pull("nope", registry=reg)
    from kvmerge_local.cli import main

    assert main(["pull", "good", "--registry", str(reg), "--dest", str(tmp_path / "d5"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("model.gguf")


def test_resolve_model(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert models.resolve_model(f) == (f, None)
    reg = tmp_path / "models.txt"
    reg.write_text(f"mine org/repo m.gguf unverified unverified llama2 4096\n")
    monkeypatch.setenv("KVMERGE_MODELS_TXT", str(reg))
    monkeypatch.setenv("KVMERGE_MODELS", str(tmp_path / "none"))
    with pytest.raises(ModelError, match="pull mine"):
        models.resolve_model("mine")
    monkeypatch.setenv("KVMERGE_MODELS", str(tmp_path))
    path, entry = models.resolve_model("mine")
    assert path == f and entry.name == "mine"
    with pytest.raises(ModelError, match="neither a file"):
        models.resolve_model("other")
