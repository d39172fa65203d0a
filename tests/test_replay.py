"""KVzip replay scoring (kvmerge_local.engine.replay) on real llama.cpp with tiny models.

The replay must leave the cache exactly as it was, its scores must equal a NumPy softmax of the reference
model's replay queries (chunked, cued, removed per chunk, summed per decode call, max over calls and over
each KV head's query-head group), a failure midway must clean up, and the session's ``kvzip`` method must
keep the sinks, the newest cell and the top cells by exactly those scores.
"""
from __future__ import annotations

import numpy as np
import pytest

from _bridge_util import GQA_MODEL, prompt_tokens, random_plan
from kvmerge_local import Session
from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel
from kvmerge_local.engine import session as session_mod
from kvmerge_local.engine.replay import CUE_TOKENS, replay_scores
from kvmerge_local.errors import KVMergeError
from kvmerge_local.methods import get_method
from support import reference as ref

pytestmark = pytest.mark.llama
TOL = 2e-3  # as tests/test_bridge_evidence.py: the reference mirrors ggml's roundings, not its summation order

N_DOC = 70
FIRST = np.array([101, 202, 303, 404, 505], np.int32)  # stand-ins for the tokenized replay instructions
LATER = np.array([606, 707, 808, 909], np.int32)
CHUNK, STEP = 32, 5  # chunks of 32, 32 and 6 doc tokens; 5 does not divide the replay lengths (partial steps)


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    m = LlamaModel(tiny_model_factory(**GQA_MODEL))
    yield m
    m.close()


def _ctx(model, fa=True, **kw):
    kw.setdefault("n_ctx", 256)
    return LlamaContext(model, flash_attn=fa, n_threads=1, **kw)


def _doc():
    return prompt_tokens(N_DOC, seed=41)


def _prefilled(model, fa=True, compacted=False):
    """A context holding the document (optionally compacted to 40 cells with a per-head random plan)."""
    ctx = _ctx(model, fa)
    br = KVBridge(ctx)
    ctx.decode(_doc(), logits="none")
    if compacted:
        br.compact(random_plan(2, 2, N_DOC, 40, seed=43))
    return ctx, br


def reference_replay(weights, doc, first, later, chunk, step, fa, *, cue=CUE_TOKENS, group=np.max):
    """float32[L, n_kv_head, N] KVzip scores from the NumPy reference model (see the module docstring);
    ``cue`` (previous chunk's tokens after ``later``) and ``group`` (reduction over a KV head's query heads)
    can be changed to show that the comparison tells such variants apart."""
    c = weights.config
    N = len(doc)
    pre = ref.prefill(weights, doc, flash_attn=fa)
    doc_pos = np.arange(N, dtype=np.int32)
    best = np.zeros((c.n_layer, c.n_head, N), np.float32)
    for c0 in range(0, N, chunk):
        head = first if c0 == 0 else np.concatenate([later, doc[max(0, c0 - cue):c0]])
        seq = np.concatenate([head, doc[c0:c0 + chunk]]).astype(np.int32)
        pos = N + np.arange(len(seq), dtype=np.int32)  # every chunk starts right after the document again
        out = ref.decode_many_with_cache(weights, pre.k, pre.v, doc_pos, seq, pos, flash_attn=fa)
        keys = np.concatenate([pre.k, out.k], axis=2)
        key_pos = np.concatenate([doc_pos, pos])
        for s0 in range(0, len(seq), step):
            ev = ref.attention_evidence(out.q[:, :, s0:s0 + step], keys, pos[s0:s0 + step], key_pos)
            best = np.maximum(best, ev[:, :, :N])
    return group(best.reshape(c.n_layer, c.n_kv_head, c.n_group, N), axis=2)


# --- 1. the cache is exactly as it was ------------------------------------------------------------------

@pytest.mark.parametrize("compacted", [False, True])
@pytest.mark.parametrize("fa", [False, True])
def test_replay_leaves_cache_and_logits_bit_identical(model, fa, compacted):
    ctx, br = _prefilled(model, fa, compacted)
    twin, twin_br = _prefilled(model, fa, compacted)
    pos0, blob0, n_past0 = br.cell_positions(), br.read().blob.copy(), ctx.n_past
    assert np.array_equal(pos0, twin_br.cell_positions())

    scores = replay_scores(br, _doc(), FIRST, LATER, chunk_size=CHUNK, step=STEP)
    assert scores.shape == (2, 2, len(pos0)) and scores.dtype == np.float32
    assert (scores > 0).all()  # every cached cell was visible to the replay queries

    assert np.array_equal(br.cell_positions(), pos0) and ctx.n_past == n_past0
    assert np.array_equal(br.read().blob, blob0)  # K, V and positions byte for byte
    probe = np.array([1234, 77, 3001], np.int32)
    a = ctx.decode(probe, logits="all")
    b = twin.decode(probe, logits="all")
    assert np.array_equal(a, b)
    ctx.close()
    twin.close()


# --- 2. the scores equal the NumPy reference --------------------------------------------------------------

@pytest.mark.parametrize("fa", [False, True])
def test_replay_scores_match_numpy(model, tiny_weights_factory, fa):
    doc, weights = _doc(), tiny_weights_factory(**GQA_MODEL)
    ctx, br = _prefilled(model, fa)
    got = replay_scores(br, doc, FIRST, LATER, chunk_size=CHUNK, step=STEP)
    expect = reference_replay(weights, doc, FIRST, LATER, CHUNK, STEP, fa)
    assert got.shape == expect.shape == (2, 2, N_DOC)
    err = np.abs(got - expect) / np.maximum(np.abs(expect), 1e-2)
    print(f"\nreplay scores vs NumPy (fa={fa}): max abs {np.abs(got - expect).max():.2e}, max rel {err.max():.2e}")
    np.testing.assert_allclose(got, expect, atol=TOL, rtol=TOL)
    # the comparison tells the variants apart: one unchunked replay, chunks without their cue tokens, the
    # sum (instead of the max) over the group's query heads, a step of 1 -- all far from what was measured
    variants = {"unchunked": reference_replay(weights, doc, FIRST, LATER, N_DOC, STEP, fa),
                "no cue": reference_replay(weights, doc, FIRST, LATER, CHUNK, STEP, fa, cue=0),
                "group sum": reference_replay(weights, doc, FIRST, LATER, CHUNK, STEP, fa, group=np.sum),
                "step 1": reference_replay(weights, doc, FIRST, LATER, CHUNK, 1, fa)}
    for name, other in variants.items():
        assert np.abs(got - other).max() > 20 * TOL, name
    ctx.close()


def test_replay_step_one_is_the_exact_max_over_queries(model, tiny_weights_factory):
    """With ``step=1`` each decode call holds one query: the score is the max single-query attention."""
    doc, weights = _doc(), tiny_weights_factory(**GQA_MODEL)
    ctx, br = _prefilled(model)
    got = replay_scores(br, doc, FIRST, LATER, chunk_size=CHUNK, step=1)
    expect = reference_replay(weights, doc, FIRST, LATER, CHUNK, 1, True)
    np.testing.assert_allclose(got, expect, atol=TOL, rtol=TOL)
    assert got.max() <= 1.0 + 1e-5  # one softmax row: no cell gets more than 1
    ctx.close()


# --- 3. a failure midway cleans up ------------------------------------------------------------------------

@pytest.mark.parametrize("fail_at", [1, 3, 8, 9, 12])  # 8: last call of chunk 1 (37 tokens / 5), 9: chunk 2's first
def test_failure_midway_removes_replay_cells_and_disables_evidence(model, monkeypatch, fail_at):
    ctx, br = _prefilled(model)
    twin, _ = _prefilled(model)
    pos0, blob0 = br.cell_positions(), br.read().blob.copy()
    real_decode = ctx.decode
    calls = []

    def flaky(tokens, *a, **kw):
        calls.append(len(tokens))
        if len(calls) == fail_at:
            raise RuntimeError("decode failed on purpose")
        return real_decode(tokens, *a, **kw)

    monkeypatch.setattr(ctx, "decode", flaky)
    with pytest.raises(RuntimeError, match="on purpose"):
        replay_scores(br, _doc(), FIRST, LATER, chunk_size=CHUNK, step=STEP)
    monkeypatch.undo()
    assert len(calls) == fail_at
    assert np.array_equal(br.cell_positions(), pos0) and ctx.n_past == N_DOC
    assert np.array_equal(br.read().blob, blob0)
    with pytest.raises(KVMergeError, match="not enabled"):  # evidence is off again
        br.evidence()
    probe = np.array([55, 66], np.int32)
    assert np.array_equal(ctx.decode(probe, logits="all"), twin.decode(probe, logits="all"))
    ctx.close()
    twin.close()


# --- 4. the session's kvzip method keeps sinks, newest and the top replay scores -------------------------

WORDS = ("the river runs north past the stone house where light falls on paper and the "
         "old mill turns slowly under a grey sky while birds sing").split()


def _text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)) + "."


def _expected_kept(scores: np.ndarray, m: int, n_sink: int) -> np.ndarray:
    """int32[L, H, m]: the first ``n_sink`` cells, the newest, and the top others (ties: newer first)."""
    L, H, N = scores.shape
    out = np.empty((L, H, m), np.int32)
    for l in range(L):
        for h in range(H):
            mid = np.arange(n_sink, N - 1)
            order = sorted(mid.tolist(), key=lambda i: (-float(scores[l, h, i]), -i))
            out[l, h] = np.sort(np.r_[np.arange(n_sink), order[:m - n_sink - 1], N - 1])
    return out


def test_session_kvzip_keeps_sinks_newest_and_top_replay_scores(tiny_model_factory, monkeypatch):
    path = tiny_model_factory(**GQA_MODEL)
    params = {"chunk_size": 48, "step": 8}  # several replay chunks with cues
    calls = []
    real = session_mod.replay_scores

    def spy(bridge, toks, first, later, **kw):  # records the replay's inputs (the prompts are the session's)
        calls.append((np.array(toks), np.array(first), np.array(later), kw))
        return real(bridge, toks, first, later, **kw)

    monkeypatch.setattr(session_mod, "replay_scores", spy)
    with Session.open(path, n_ctx=512, method="kvzip", budget=0.5, n_threads=1, method_params=params) as s:
        st = s.ingest(_text(90, seed=3))
        doc = s.cache.tokens.copy()
        N = len(doc)
        assert st.tokens_ingested == N and N < (512 - s.reserve) // 2  # one prefill decode, one compaction
        assert st.n_compactions == 1 and st.n_reindex == 0
        kept = s.kept_positions()
    assert len(calls) == 1
    toks, first, later, kw = calls[0]
    assert np.array_equal(toks, doc) and kw == params and len(first) > 0 and len(later) > 0
    # the twin: same model file and context settings, the same tokens in one decode, then its own replay
    twin_model = LlamaModel(path)
    twin = LlamaContext(twin_model, n_ctx=512, flash_attn=True, n_threads=1)
    twin.decode(doc, logits="none")
    scores = replay_scores(KVBridge(twin), doc, first, later, **params)
    twin.close()
    twin_model.close()
    m = int(round(0.5 * N))
    assert kept.shape == (2, 2, m) and st.doc_cells == m
    expect = _expected_kept(scores, m, n_sink=get_method("kvzip").n_sink)
    assert np.array_equal(kept, expect)
    # per (layer, KV head) choices really differ: the test is not passing on a shared layout by accident
    assert len({tuple(kept[l, h]) for l in range(2) for h in range(2)}) > 1


def test_session_kvzip_replays_each_document_token_once(tiny_model_factory, monkeypatch):
    """Compress-as-you-go: every compaction replays only the tokens cached since the last one, and all
    document tokens before the last compaction are replayed exactly once, in order."""
    path = tiny_model_factory(**GQA_MODEL)
    seen = []
    real = session_mod.replay_scores

    def spy(bridge, toks, *a, **kw):
        seen.append((np.asarray(toks).copy(), bridge.cell_positions().copy()))
        return real(bridge, toks, *a, **kw)

    monkeypatch.setattr(session_mod, "replay_scores", spy)
    with Session.open(path, n_ctx=256, method="kvzip", budget=0.5, n_threads=1,
                      method_params={"chunk_size": 32, "step": 8}) as s:
        st = s.ingest(_text(360, seed=4))
        doc = s.cache.tokens.copy()
        assert st.n_compactions >= 3 and len(seen) == st.n_compactions
        replayed = np.concatenate([t for t, _ in seen])
        assert np.array_equal(replayed, doc[:len(replayed)])
        assert st.n_reindex == 0  # cell positions are document positions
        done = 0
        for toks, cells in seen:  # each replay covers the tokens cached since the last one, up to the newest
            assert len(toks) > 0 and done + len(toks) == cells.max() + 1
            done += len(toks)
        kp = s.kept_positions()
        assert kp.max() == len(doc) - 1 and np.all(np.diff(kp, axis=2) > 0)
