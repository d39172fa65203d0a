"""The embedded default model: GGUF export matches PyTorch through llama.cpp; the committed file loads.

Logit agreement, measured (llama.cpp CPU, f16 KV cache, flash attention off and on, the GGUF's f16 weights
read back into the float32 PyTorch model): max |llama.cpp - torch| / max |torch logit| is ~1e-4 on a randomly
initialized model, 4.5e-4 on the committed model (1627-token task prompt) and up to 3e-3 on early
checkpoints (ggml rounds matmul inputs, queries and the KV cache to f16 while PyTorch stays in f32; the
hand-initialized positional heads have large query weights, which makes those roundings matter more), with
the same greedy token at every position.  Asserted: TOL = 1e-2 on that ratio and greedy agreement >= 98%.
The torch tests skip when torch is not installed (``make test`` does not install the ``train`` extra); the
metadata test on the committed GGUF needs no torch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kvmerge_local.bridge import LlamaContext, LlamaModel

pytestmark = pytest.mark.llama

DATA = Path(__file__).resolve().parent.parent / "kvmerge_local" / "data"
GGUF = DATA / "kvmerge-tiny.gguf"
INFO = DATA / "kvmerge-tiny.json"
TOL = 1e-2
SAMPLE = ("The kernel reads the configuration file at boot.\n\nThe special magic word for question is "
          "answer.\n\nIt then mounts the file systems listed in fstab and starts the services.\n\n"
          "Question: What is the special magic word for question?\nAnswer: The special magic word for question is")


def _llama_logits(path: Path, tokens: np.ndarray, flash_attn: bool) -> np.ndarray:
    m = LlamaModel(path)
    try:
        with LlamaContext(m, n_ctx=1024, n_threads=1, flash_attn=flash_attn) as ctx:
            return ctx.decode(tokens, logits="all")
    finally:
        m.close()


def _check_against_torch(path: Path, tokens: np.ndarray) -> None:
    torch = pytest.importorskip("torch")
    from train.export import load_gguf_model

    model = load_gguf_model(path)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens.astype(np.int64))[None])[0].numpy()
    for fa in (False, True):
        got = _llama_logits(path, tokens, fa)
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        assert err < TOL, f"flash_attn={fa}: relative logit error {err:.2e}"
        assert agree >= 0.98, f"flash_attn={fa}: greedy agreement {agree:.3f}"


def _prompt(path: Path, n: int = 400) -> np.ndarray:
    m = LlamaModel(path)
    try:
        text = (SAMPLE + " ") * 8
        return m.tokenize(text, add_bos=True)[:n]
    finally:
        m.close()


def test_export_roundtrip_logits_match_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from train.export import export_gguf
    from train.model import LlamaLM, default_config

    torch.manual_seed(0)
    model = LlamaLM(default_config(n_layer=3))  # PyTorch's default (random) init
    with torch.no_grad():
        model.output_norm.weight.fill_(4.0)  # a spread of logits like a trained model's
    path = export_gguf(model, tmp_path / "m.gguf", extra={"seed": 3})
    _check_against_torch(path, _prompt(path))


@pytest.mark.skipif(not GGUF.exists(), reason="no committed kvmerge-tiny.gguf")
def test_committed_model_logits_match_torch():
    _check_against_torch(GGUF, _prompt(GGUF, 600))


@pytest.mark.skipif(not GGUF.exists(), reason="no committed kvmerge-tiny.gguf")
def test_committed_model_metadata():
    info = json.loads(INFO.read_text())
    assert GGUF.stat().st_size < 25_000_000
    assert hashlib.sha256(GGUF.read_bytes()).hexdigest() == info["sha256"]
    m = LlamaModel(GGUF)
    try:
        assert m.info["arch"] == "llama"
        c = info["config"]
        assert (m.info["n_layer"], m.info["n_head"], m.info["n_head_kv"], m.info["n_embd"], m.n_vocab) == \
            (c["n_layer"], c["n_head"], c["n_kv_head"], c["d_model"], c["n_vocab"])
        assert m.info["n_head"] > m.info["n_head_kv"]  # GQA
        assert m.geom.head_dim == c["head_dim"]
        assert m.meta("kvmerge.recipe_sha256") == info["recipe_sha256"]
        assert int(m.meta("kvmerge.seed")) == info["seed"]
        assert m.meta("tokenizer.ggml.model") == "llama"
        assert float(m.meta("llama.rope.freq_base")) == c["rope_freq_base"]
        # the tokenizer is the Llama-2 prefix: answer words are single tokens, BOS is 1
        ids = m.tokenize("Answer: The special magic word for question is answer.", add_bos=True)
        assert ids[0] == 1 and b" answer" in [m.piece(int(t)) for t in ids]
        # a held-out accuracy through llama.cpp was measured and recorded
        assert info["llama_cpp_eval"]["overall"]["n"] > 0
    finally:
        m.close()
