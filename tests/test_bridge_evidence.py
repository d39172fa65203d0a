"""Attention evidence computed on the device by the patch vs a NumPy softmax of the reference model."""
from __future__ import annotations

import numpy as np
import pytest

from _bridge_util import GQA_MODEL, prompt_tokens, random_plan
from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel
from support import reference as ref

pytestmark = pytest.mark.llama
TOL = 2e-3


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    m = LlamaModel(tiny_model_factory(**GQA_MODEL))
    yield m
    m.close()


@pytest.fixture(scope="module")
def weights(tiny_weights_factory):
    return tiny_weights_factory(**GQA_MODEL)


def _ctx(model, fa, **kw):
    kw.setdefault("n_ctx", 256)
    return LlamaContext(model, flash_attn=fa, n_threads=1, **kw)


@pytest.mark.parametrize("fa", [False, True])
@pytest.mark.parametrize("window", [8, 0])
def test_evidence_matches_numpy(model, weights, fa, window):
    N = 97
    toks = prompt_tokens(N, seed=22)
    ctx = _ctx(model, fa)
    br = KVBridge(ctx)
    br.enable_evidence(window)
    ctx.decode(toks, logits="none")
    got = br.evidence(per_kv_head=False)
    out = ref.prefill(weights, toks)
    expect = ref.attention_evidence(out.q, out.k, np.arange(N), np.arange(N), window=window or None)
    assert got.shape == (2, 4, N)
    np.testing.assert_allclose(got, expect, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got.sum(axis=2), window or N, rtol=1e-4)
    # GQA: per KV head is the sum over its group of query heads (head h uses KV head h // 2)
    np.testing.assert_allclose(br.evidence(), got.reshape(2, 2, 2, N).sum(axis=2), rtol=1e-6)


@pytest.mark.parametrize("fa", [False, True])
def test_window_spanning_ubatches(model, weights, fa):
    N, W = 100, 48  # ubatches of 32: the window covers the ends of three of them
    toks = prompt_tokens(N, seed=23)
    ctx = _ctx(model, fa, n_ubatch=32)
    br = KVBridge(ctx)
    br.enable_evidence(W)
    ctx.decode(toks, logits="none")
    out = ref.prefill(weights, toks)
    expect = ref.attention_evidence(out.q, out.k, np.arange(N), np.arange(N), window=W)
    np.testing.assert_allclose(br.evidence(per_kv_head=False), expect, atol=TOL, rtol=TOL)


def test_evidence_accumulates_over_decode_calls_and_resets(model, weights):
    N1, N2, W = 60, 40, 10
    toks = prompt_tokens(N1 + N2, seed=24)
    ctx = _ctx(model, True)
    br = KVBridge(ctx)
    br.enable_evidence(W)
    ctx.decode(toks[:N1], logits="none")
    ctx.decode(toks[N1:], logits="none")
    out = ref.prefill(weights, toks)
    pos = np.arange(N1 + N2)
    first = ref.attention_evidence(out.q[:, :, :N1], out.k[:, :, :N1], pos[:N1], pos[:N1], window=W)
    second = ref.attention_evidence(out.q, out.k, pos, pos, window=W)
    expect = second.copy()
    expect[:, :, :N1] += first
    np.testing.assert_allclose(br.evidence(per_kv_head=False), expect, atol=TOL, rtol=TOL)
    br.reset_evidence()
    assert not br.evidence().any()


@pytest.mark.parametrize("fa", [False, True])
def test_evidence_leaves_logits_bit_identical(model, fa):
    toks = prompt_tokens(70, seed=25)
    plain = _ctx(model, fa)
    a = plain.decode(toks, logits="all")
    observed = _ctx(model, fa)
    KVBridge(observed).enable_evidence(16)
    b = observed.decode(toks, logits="all")
    assert np.array_equal(a, b)


def test_evidence_after_compaction_follows_cells(model):
    """After a compaction cells move to new slots; evidence is reported in the new blob order."""
    toks = prompt_tokens(120, seed=26)
    ctx = _ctx(model, True)
    br = KVBridge(ctx)
    ctx.decode(toks[:100], logits="none")
    br.compact(random_plan(2, 2, 100, 40, seed=27))
    br.enable_evidence(0)
    ctx.decode(toks[100:], logits="none")
    st = br.read()
    ev = br.evidence(st)
    assert ev.shape == (2, 2, 60)
    # every new query attends to itself and earlier cells only: the 20 new tokens' rows sum to 20 per query head
    np.testing.assert_allclose(ev.sum(axis=2), 20 * 2, rtol=1e-4)
    assert (ev[:, :, 40:] > 0).all()
