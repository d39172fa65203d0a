"""Attention evidence on the real model's attention geometry (SmolLM2-135M: 30 layers, 9 query heads over 3 KV
heads, head_dim 64, d_model 576, RoPE base 100000), compared with attention computed another way.

Tier 1 (always): a tiny random model with that geometry (``make_tiny_llama``, the project's SPM vocab) against
the NumPy reference forward: window and all-query evidence with flash attention on and off, chunked prefill
(each ``llama_decode`` adds its own last-``w``-queries window), and the per-KV-head sums over each group.

Hidden states of a 30-layer random network drift apart between ggml and NumPy (f16 cache rounding and
summation order compound): layer 0 agrees to ~1e-3 like tests/test_bridge_evidence.py; deeper layers to a few
1e-2 in absolute evidence (sums of up to 60 queries).  Each comparison therefore also checks that the usual
ways of getting evidence wrong (another GQA head mapping, another score scale, cells shifted by one, a causal
mask off by one) land far outside the tolerance, in the deep layers too.

Tier 2 (when the real SmolLM2 GGUF is present, else skipped): softmax rows sum to 1, so all-query evidence
sums to the number of queries per (layer, head), window evidence to the window; one decode of a ~300-token
text gives the same evidence as three chunked decodes; and layer 0's evidence equals a NumPy softmax of
queries and keys computed from the dequantized GGUF weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel
from support import reference as ref

pytestmark = pytest.mark.llama

GEOM = dict(n_layer=30, n_head=9, n_kv_head=3, head_dim=64, d_model=576, n_ff=1536, rope_freq_base=100000.0,
            vocab="llama2-small", n_vocab=4096, seed=7, weight_type="f16")
L, HQ, HK, G = 30, 9, 3, 3
T = 60
TOL = 2e-3        # layer 0: no drift, the evidence-test tolerance
DRIFT = 0.1       # all layers: absolute, for sums of up to T = 60 queries (measured max 0.038; bugs >= 2.7)
DRIFT_W = 0.05    # all layers, window evidence, sums of <= 8 queries (measured max 0.016; bugs >= 0.64)


@pytest.fixture(scope="module")
def geom_model(tiny_model_factory):
    m = LlamaModel(tiny_model_factory(**GEOM))
    assert (m.geom.n_layer, m.geom.n_kv_head, m.geom.head_dim, int(m.info["n_head"])) == (L, HK, 64, HQ)
    yield m
    m.close()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(71).integers(3, 4096, T).astype(np.int32)


@pytest.fixture(scope="module")
def reference(tiny_weights_factory, tokens):
    w = tiny_weights_factory(**GEOM)
    assert (w.config.n_head, w.config.n_kv_head, w.config.rope_freq_base) == (HQ, HK, 100000.0)
    return ref.prefill(w, tokens)


def _ctx(model, fa, **kw):
    return LlamaContext(model, n_ctx=kw.pop("n_ctx", 128), flash_attn=fa, n_threads=2, **kw)


def _wrong_variants(q, k, pos, window):
    """Reference evidence as a buggy patch would compute it (each one a plausible bug)."""
    e = ref.attention_evidence(q, k, pos, pos, window=window)
    return {
        # query head h on KV head h % n_kv_head instead of h // n_group (k with one entry per query head)
        "gqa h % n_kv": ref.attention_evidence(q, k[:, np.arange(HQ) % HK], pos, pos, window=window),
        "scale 1/head_dim": ref.attention_evidence(q / np.sqrt(64), k, pos, pos, window=window),
        "mask shows the next token": ref.attention_evidence(q, k, pos + 1, pos, window=window),
        "cells shifted by one": np.roll(e, 1, axis=2),
    }


def _check(got, expect, q, k, pos, window, drift):
    """Layer 0 tight, every layer within the drift tolerance, and every wrong variant far outside it."""
    err = np.abs(got - expect)
    print(f"\n  window {window}: layer 0 max abs {err[0].max():.2e}, all layers max abs {err.max():.2e} "
          f"(layer {int(err.max(axis=(1, 2)).argmax())})")
    np.testing.assert_allclose(got[0], expect[0], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got, expect, atol=drift, rtol=0)
    deep = slice(L // 2, L)
    for name, bad in _wrong_variants(q, k, pos, window).items():
        print(f"    {name}: deep layers {np.abs(got[deep] - bad[deep]).max():.3f}, "
              f"layer 0 {np.abs(got[0] - bad[0]).max():.3f}")
        assert np.abs(got[deep] - bad[deep]).max() > 3 * drift, name
        assert np.abs(got[0] - bad[0]).max() > 10 * TOL, name


# --- tier 1: tiny random model with SmolLM2's attention geometry --------------------------------------------

@pytest.mark.parametrize("fa", [False, True])
@pytest.mark.parametrize("window", [8, 0])
def test_evidence_matches_numpy_on_smollm2_geometry(geom_model, reference, tokens, fa, window):
    ctx = _ctx(geom_model, fa)
    br = KVBridge(ctx)
    br.enable_evidence(window)
    ctx.decode(tokens, logits="none")
    got = br.evidence(per_kv_head=False)
    assert got.shape == (L, HQ, T)
    pos = np.arange(T)
    expect = ref.attention_evidence(reference.q, reference.k, pos, pos, window=window or None)
    _check(got, expect, reference.q, reference.k, pos, window or None, DRIFT_W if window else DRIFT)
    np.testing.assert_allclose(got.sum(axis=2), window or T, rtol=1e-4)  # softmax rows sum to 1
    ctx.close()


@pytest.mark.parametrize("fa", [False, True])
def test_chunked_prefill_adds_each_chunks_window(geom_model, reference, tokens, fa):
    """Three decode calls with window w: the accumulator holds, per chunk, the evidence of that chunk's last
    w queries (all of a chunk shorter than w) over the cells cached at that time."""
    W, bounds = 8, [0, 23, 28, 60]  # the middle chunk (5 tokens) is shorter than the window
    ctx = _ctx(geom_model, fa)
    br = KVBridge(ctx)
    br.enable_evidence(W)
    for a, b in zip(bounds, bounds[1:]):
        ctx.decode(tokens[a:b], logits="none")
    got = br.evidence(per_kv_head=False)
    q, k, pos = reference.q, reference.k, np.arange(T)
    expect = np.zeros((L, HQ, T), np.float32)
    for a, b in zip(bounds, bounds[1:]):
        lo = max(a, b - W)
        expect[:, :, :b] += ref.attention_evidence(q[:, :, lo:b], k[:, :, :b], pos[lo:b], pos[:b])
    err = np.abs(got - expect)
    print(f"\n  chunked: layer 0 max abs {err[0].max():.2e}, all layers {err.max():.2e}")
    np.testing.assert_allclose(got[0], expect[0], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(got, expect, atol=2 * DRIFT_W, rtol=0)
    np.testing.assert_allclose(got.sum(axis=2), W + 5 + W, rtol=1e-4)
    # not what one decode of the whole text with window w would give, nor a window carried across chunks
    single = ref.attention_evidence(q, k, pos, pos, window=W)
    spanning = ref.attention_evidence(q[:, :, 20:28], k[:, :, :28], pos[20:28], pos[:28])  # 8 before the 3rd
    wrong_mid = expect.copy()
    wrong_mid[:, :, :28] += spanning
    wrong_mid[:, :, :28] -= ref.attention_evidence(q[:, :, 23:28], k[:, :, :28], pos[23:28], pos[:28])
    for name, bad in (("one window", single), ("window spanning chunks", wrong_mid)):
        assert np.abs(got - bad).max() > 3 * DRIFT_W, name
    ctx.close()


@pytest.mark.parametrize("fa", [False, True])
def test_per_kv_head_is_the_sum_over_its_group(geom_model, reference, tokens, fa):
    ctx = _ctx(geom_model, fa)
    br = KVBridge(ctx)
    br.enable_evidence(0)
    ctx.decode(tokens, logits="none")
    per_q = br.evidence(per_kv_head=False)
    per_kv = br.evidence()
    assert per_kv.shape == (L, HK, T)
    # KV head j serves query heads 3j, 3j+1, 3j+2 (llama.cpp's h // n_group)
    groups = np.stack([per_q[:, [3 * j, 3 * j + 1, 3 * j + 2]].sum(axis=1) for j in range(HK)], axis=1)
    np.testing.assert_allclose(per_kv, groups, rtol=1e-6, atol=1e-6)
    pos = np.arange(T)
    expect = ref.attention_evidence(reference.q, reference.k, pos, pos).reshape(L, HK, G, T).sum(axis=2)
    np.testing.assert_allclose(per_kv[0], expect[0], atol=G * TOL, rtol=TOL)
    np.testing.assert_allclose(per_kv, expect, atol=G * DRIFT, rtol=0)
    interleaved = per_q.reshape(L, G, HK, T).sum(axis=1)  # the wrong grouping h % n_kv
    assert np.abs(per_kv - interleaved).max() > 1.0
    np.testing.assert_allclose(per_kv.sum(axis=2), G * T, rtol=1e-4)
    ctx.close()


# --- tier 2: the real SmolLM2-135M-Instruct file ------------------------------------------------------------

def _smollm2_path() -> Path | None:
    try:
        from kvmerge_local.models import default_document_model  # noqa: PLC0415

        return default_document_model()
    except Exception:  # missing, corrupt, or no registry entry: fall back to the env / cache path
        pass
    env = os.environ.get("KVMERGE_SMOLLM2")
    p = Path(env) if env else Path.home() / ".cache/kvmerge-local/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


TEXT = (
    "The harbour town of Ellery sits where the river Marrow meets the grey northern sea. For three centuries "
    "its people fished for herring, mended nets on the stone quay, and traded salt fish for wool and timber "
    "brought down the river by barge. In 1871 a railway reached the town, and within a decade the old "
    "warehouses by the water had become canneries. The Marrow Canning Company employed nearly four hundred "
    "workers at its peak, most of them women who sorted, cleaned and packed the catch by hand. A fire in the "
    "winter of 1903 destroyed the largest cannery, and the company moved its works to a new brick building "
    "on the eastern bank. The lighthouse on Gull Point, built in 1858, still guides boats past the sandbars "
    "at the river mouth; its keeper, Thomas Varden, kept a logbook for forty-one years that records every "
    "storm, every wreck and the return of the swallows each spring. Today the canneries are closed. The "
    "eastern building houses a museum of the fishing trade, a library and a small school of boat building, "
    "where apprentices learn to steam oak planks and fit them to a frame. Visitors walk along the quay, eat "
    "smoked fish from the stalls by the market hall, and climb the two hundred steps of Gull Point to look "
    "across the water towards the islands, which on a clear evening seem close enough to touch."
)


@pytest.fixture(scope="module")
def smollm2():
    p = _smollm2_path()
    if p is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF not present (make setup, or set KVMERGE_SMOLLM2)")
    m = LlamaModel(p)
    yield m
    m.close()


@pytest.fixture(scope="module")
def text_tokens(smollm2):
    toks = smollm2.tokenize(TEXT, add_bos=False)
    assert 250 <= len(toks) <= 400, len(toks)
    return np.asarray(toks, np.int32)


@pytest.fixture(scope="module")
def real_evidence(smollm2, text_tokens):
    """``(window, fa, chunks=()) -> (evidence float32[L, n_head, n], KVState)`` of the text decoded in one call
    or split at ``chunks``; memoized (a 300-token decode of SmolLM2 takes ~1.5 s on two shared cores)."""
    memo = {}

    def get(window, fa, chunks=()):
        key = (window, fa, tuple(chunks))
        if key not in memo:
            ctx = LlamaContext(smollm2, n_ctx=512, flash_attn=fa, n_threads=2)
            br = KVBridge(ctx)
            br.enable_evidence(window)
            bounds = [0, *chunks, len(text_tokens)]
            for a, b in zip(bounds, bounds[1:]):
                ctx.decode(text_tokens[a:b], logits="none")
            memo[key] = (br.evidence(per_kv_head=False), br.read())
            ctx.close()
        return memo[key]

    return get


@pytest.mark.parametrize("fa", [False, True])
def test_real_model_softmax_rows_sum_to_one(smollm2, text_tokens, real_evidence, fa):
    n = len(text_tokens)
    assert (smollm2.geom.n_layer, int(smollm2.info["n_head"]), smollm2.geom.n_kv_head) == (L, HQ, HK)
    ev, _ = real_evidence(0, fa)
    assert ev.shape == (L, HQ, n) and (ev >= 0).all()
    sums = ev.sum(axis=2)
    print(f"\n  SmolLM2 window 0: row sums / n in [{sums.min() / n:.6f}, {sums.max() / n:.6f}]")
    np.testing.assert_allclose(sums, n, rtol=1e-4)
    # causal: the first cell is seen by every query, the last one only by itself (a share of one row)
    assert (ev[:, :, -1] <= 1.0 + 1e-5).all()
    evw, _ = real_evidence(16, fa)
    np.testing.assert_allclose(evw.sum(axis=2), 16, rtol=1e-4)
    assert (evw[:, :, n - 1] > 0).all()  # the newest cell is seen by (at least) the last query


def test_real_model_chunked_equals_one_decode(text_tokens, real_evidence):
    n, fa = len(text_tokens), True  # flash attention: the session default (the other path: rows-sum test)
    one, st1 = real_evidence(0, fa)
    three, st3 = real_evidence(0, fa, chunks=(n // 3, 2 * n // 3))
    err = np.abs(one - three)
    print(f"\n  SmolLM2 one decode vs 3 chunks: max abs {err.max():.2e}, max rel "
          f"{(err / np.maximum(one, 1e-2)).max():.2e}; max evidence {one.max():.1f}")
    np.testing.assert_allclose(three, one, atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(three.sum(axis=2), n, rtol=1e-4)
    # and window evidence of chunks is NOT window evidence of one decode (3 windows vs 1)
    k_err = np.abs(st1.k4.astype(np.float32) - st3.k4.astype(np.float32)).max()
    print(f"  cached K, one decode vs 3 chunks: max abs {k_err:.2e}")
    assert k_err < 1e-2
    w1, _ = real_evidence(16, fa)
    w3, _ = real_evidence(16, fa, chunks=(n // 3, 2 * n // 3))
    np.testing.assert_allclose(w3.sum(axis=2), 3 * 16, rtol=1e-4)
    # ... the last chunk's window is the one decode's window; the first two chunks add their own
    np.testing.assert_allclose(w3[:, :, 2 * n // 3:], w1[:, :, 2 * n // 3:], atol=2e-3, rtol=1e-3)
    assert (w3[:, :, n // 3 - 1] > w1[:, :, n // 3 - 1]).all()  # chunk 1's last token: seen by its own window


def _dequantized(reader, name):
    from gguf.quants import dequantize  # noqa: PLC0415

    t = next(t for t in reader.tensors if t.name == name)
    return dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape))).astype(np.float32)


def _q8_1(x):
    """ggml's on-the-fly Q8_1 quantization of a Q4_1 matmul's activations (blocks of 32)."""
    b = x.reshape(x.shape[0], -1, 32)
    d = np.abs(b).max(axis=2, keepdims=True) / 127.0
    qv = np.round(np.where(d > 0, b / np.where(d > 0, d, 1), 0))
    return (qv * d.astype(np.float16).astype(np.float32)).reshape(x.shape).astype(np.float32)


@pytest.fixture(scope="module")
def layer0_numpy(smollm2, text_tokens):
    """Layer 0's post-RoPE queries float32[1, 9, n, 64] and f16 keys float32[1, 3, n, 64] recomputed in NumPy
    from the dequantized GGUF weights (token_embd Q8_0; attn_q/attn_k Q4_1 against Q8_1-quantized
    activations, as ggml's CPU matmul does; NORM RoPE with base 1e5)."""
    from gguf import GGUFReader  # noqa: PLC0415

    n = len(text_tokens)
    r = GGUFReader(str(smollm2.path))
    x = _dequantized(r, "token_embd.weight")[text_tokens]
    eps = float(r.fields["llama.attention.layer_norm_rms_epsilon"].contents())
    hq = _q8_1(ref.rms_norm(x, _dequantized(r, "blk.0.attn_norm.weight"), eps))
    pos = np.arange(n)
    q = ref.apply_rope((hq @ _dequantized(r, "blk.0.attn_q.weight").T).reshape(n, HQ, 64), pos, 100000.0)
    k = ref.apply_rope((hq @ _dequantized(r, "blk.0.attn_k.weight").T).reshape(n, HK, 64), pos, 100000.0)
    return q.transpose(1, 0, 2)[None], k.transpose(1, 0, 2)[None].astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("fa", [False, True])
def test_real_model_layer0_evidence_matches_numpy_from_dequantized_weights(text_tokens, real_evidence,
                                                                           layer0_numpy, fa):
    """The keys recomputed from the GGUF match the cache, and the evidence matches a NumPy softmax."""
    q, k = layer0_numpy
    pos = np.arange(len(text_tokens))
    ev, st = real_evidence(0, fa)
    k_cache = np.asarray(st.k4[0], np.float32)
    k_err = np.abs(k_cache - k[0]).max() / np.abs(k[0]).max()
    expect = ref.attention_evidence(q, k, pos, pos)[0]
    err = np.abs(ev[0] - expect)
    print(f"\n  SmolLM2 layer 0: K rel err {k_err:.2e}; evidence max abs {err.max():.2e}, "
          f"max {expect.max():.1f}")
    assert k_err < 5e-3
    np.testing.assert_allclose(ev[0], expect, atol=0.02, rtol=5e-3)
    bad = ref.attention_evidence(q, k[:, np.arange(HQ) % HK], pos, pos)[0]  # wrong GQA mapping
    assert np.abs(ev[0] - bad).max() > 1.0
