"""Bad inputs to the bridge get clear errors: missing/corrupt/foreign GGUF files, an unpatched library."""
from __future__ import annotations

import ctypes
import pathlib

import pytest

from kvmerge_local.bridge import LlamaContext, LlamaModel, _lib
from kvmerge_local.errors import ModelError, PatchMissingError
from _bridge_util import GQA_MODEL
from kvmerge_local.tiny.model import make_bad_gguf

pytestmark = pytest.mark.llama


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        LlamaModel(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am a text file")
    with pytest.raises(ModelError, match="not a GGUF"):
        LlamaModel(p)
    with pytest.raises(ModelError, match="not a GGUF"):
        LlamaModel(make_bad_gguf(tmp_path / "magic.gguf", "bad_magic"))


@pytest.mark.parametrize("kind", ["truncated", "missing_tensor"])
def test_corrupt_gguf(tmp_path, kind):
    p = make_bad_gguf(tmp_path / f"{kind}.gguf", kind)
    with pytest.raises(ModelError, match="corrupt|truncated|could not load"):
        LlamaModel(p)


@pytest.mark.parametrize("kind,why", [("unknown_arch", "; kvmerge-local compacts"), ("swa", ": sliding-window")])
def test_unsupported_architecture(tmp_path, kind, why):
    p = make_bad_gguf(tmp_path / f"{kind}.gguf", kind)
    with pytest.raises(ModelError, match=f"architecture '.*' is not supported{why}"):
        LlamaModel(p)


def test_bad_context_options(tiny_model_factory):
    m = LlamaModel(tiny_model_factory(**GQA_MODEL))
    with pytest.raises(ValueError, match="kv_type"):
        LlamaContext(m, kv_type="q3_k")
    with pytest.raises(ValueError, match="flash attention"):
        LlamaContext(m, kv_type="q8_0", flash_attn=False)
    with pytest.raises(ValueError, match="n_ctx"):
        LlamaContext(m, n_ctx=4)


def test_unpatched_library_is_named():
    # libggml-base sits beside libllama and is a real library without the patch's symbols
    base = pathlib.Path(_lib.llama()._lib._name).parent
    lib = next(p for p in base.iterdir() if p.name.startswith("libggml-base.so"))
    with pytest.raises(PatchMissingError, match="make setup"):
        _lib._Lib(ctypes.CDLL(str(lib)))


def test_stale_patch_version_is_named(monkeypatch):
    built = _lib.PATCH_VERSION  # the version the library carries (this checkout's patches)
    monkeypatch.setattr(_lib, "PATCH_VERSION", 999)
    _lib.lib.cache_clear()
    try:
        with pytest.raises(PatchMissingError, match=f"patch version {built}, this code needs 999.*make setup"):
            _lib.lib()
    finally:
        monkeypatch.undo()
        _lib.lib.cache_clear()
        _lib.lib()
