"""KV bridge on real llama.cpp: exact round trips, compaction against the NumPy reference, restore on failure."""
from __future__ import annotations

import numpy as np
import pytest

from _bridge_util import GQA_MODEL, prompt_tokens, random_plan, rel_err
from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel, apply_plan_to_state, new_state, parse_state
from kvmerge_local.errors import KVMergeError, UnsupportedCacheError
from support import reference as ref
from kvmerge_local.tiny.model import load_weights

pytestmark = pytest.mark.llama

# (kv type K, kv type V, flash attention)
CACHE_CONFIGS = [("f16", "f16", False), ("f16", "f16", True), ("q8_0", "q8_0", True), ("q8_0", "f16", False),
                 ("q4_0", "q4_0", True), ("f32", "f32", False), ("bf16", "bf16", True)]


@pytest.fixture(scope="module")
def gqa_path(tiny_model_factory):
    return tiny_model_factory(**GQA_MODEL)


@pytest.fixture(scope="module")
def gqa(gqa_path):
    m = LlamaModel(gqa_path)
    yield m
    m.close()


def _filled(model, toks, kt="f16", vt="f16", fa=True, n_ctx=256, **kw):
    ctx = LlamaContext(model, n_ctx=n_ctx, flash_attn=fa, kv_type=kt, type_v=vt, n_threads=1, **kw)
    ctx.decode(toks, logits="none")
    return ctx


@pytest.mark.parametrize("kt,vt,fa", CACHE_CONFIGS)
def test_unchanged_write_back_is_bit_identical(gqa, kt, vt, fa):
    toks = prompt_tokens(120, seed=2)
    ctx = _filled(gqa, toks[:-1], kt, vt, fa)
    br = KVBridge(ctx)
    st = br.read()
    assert st.n_cells == 119 and st.v_trans == (not fa)
    expect = ctx.decode(toks[-1:])
    ctx.clear()
    br.write(st)
    got = ctx.decode(toks[-1:])
    assert np.array_equal(got, expect)
    # and through the apply path with an identity plan (copy slots move raw bytes)
    ctx.clear()
    ident = random_plan(2, 2, 119, 119, merge=False)
    assert ident.is_identity()
    new = apply_plan_to_state(st, ident)
    assert np.array_equal(new.blob, st.blob)


def test_state_views_match_reference_cache(gqa, gqa_path):
    toks = prompt_tokens(64, seed=3)
    ctx = _filled(gqa, toks, fa=False)
    st = KVBridge(ctx).read()
    out = ref.prefill(load_weights(gqa_path), toks)
    assert st.k4.shape == (2, 2, 64, 64) and st.k4.dtype == np.float16
    np.testing.assert_array_equal(st.pos, np.arange(64))
    # llama.cpp's f16 K/V vs the reference's f16-rounded ones: a few f16 ulps
    assert rel_err(st.k4.astype(np.float32), out.k) < 2e-3
    assert rel_err(st.v4.astype(np.float32), out.v) < 2e-3
    assert st.nbytes == 2 * 64 * 2 * (2 * 64 * 2)


@pytest.mark.parametrize("fa", [False, True])
@pytest.mark.parametrize("kind", ["subset", "merge", "per_head"])
def test_compaction_matches_reference_forward(gqa, gqa_path, fa, kind):
    N, m = 150, 60
    toks = prompt_tokens(N + 1, seed=4)
    ctx = _filled(gqa, toks[:N], fa=fa)
    br = KVBridge(ctx)
    plan = random_plan(2, 2, N, m, seed=5, merge=(kind == "merge"), same_layout=(kind == "subset"))
    new = br.compact(plan)
    assert new.n_cells == m and br.read().n_cells == m
    got = ctx.decode(toks[N:], positions=[N])
    w = load_weights(gqa_path)
    expect = ref.decode_with_cache(w, new.k4.astype(np.float32), new.v4.astype(np.float32),
                                   plan.cell_positions(), int(toks[N]), N)
    assert rel_err(got, expect) < 2e-3


def test_compaction_quantized_cache_matches_reference(gqa, gqa_path):
    from kvmerge_local import codec

    N, m = 130, 50
    toks = prompt_tokens(N + 1, seed=6)
    ctx = _filled(gqa, toks[:N], "q8_0", "q8_0", True)
    br = KVBridge(ctx)
    plan = random_plan(2, 2, N, m, seed=7, merge=True)
    new = br.compact(plan)
    got = ctx.decode(toks[N:], positions=[N])
    L, H, _, hb = new.k4.shape
    def deq(x4, rot):
        x = np.empty((L * H * m, 64), np.float32)
        codec.dequantize_rows(np.ascontiguousarray(x4).reshape(L * H * m, hb), new.k_type, x)
        return codec.unrotate(x, rot).reshape(L, H, m, 64)
    k = deq(new.k4, codec.rot_size(64, "k"))
    v = deq(new.v4, codec.rot_size(64, "v"))
    expect = ref.decode_with_cache(load_weights(gqa_path), k, v, plan.cell_positions(), int(toks[N]), N)
    # the new token's own K/V are q8_0 in llama.cpp and f16 in the reference: a looser bound
    assert rel_err(got, expect) < 3e-2


def test_copy_slots_stay_bit_identical_in_quantized_merge(gqa):
    toks = prompt_tokens(90, seed=8)
    ctx = _filled(gqa, toks, "q4_0", "q4_0", True)
    st = KVBridge(ctx).read()
    plan = random_plan(2, 2, 90, 40, seed=9, merge=True)
    new = apply_plan_to_state(st, plan)
    from kvmerge_local.bridge import copy_sources
    for which, a, b in (("k", st.k4, new.k4), ("v", st.v4, new.v4)):
        cs = copy_sources(plan, which)
        li, hi, ji = np.nonzero(cs >= 0)
        assert len(li) > 0
        np.testing.assert_array_equal(b[li, hi, ji], a[li, hi, cs[li, hi, ji]])


def test_failed_write_restores_original(gqa):
    toks = prompt_tokens(100, seed=10)
    ctx = _filled(gqa, toks[:-1])
    br = KVBridge(ctx)
    st = br.read()
    expect = ctx.decode(toks[-1:])
    ctx.clear()
    br.write(st)
    # a compacted blob llama.cpp must refuse: the K row size is corrupted in layer 1
    bad = apply_plan_to_state(st, random_plan(2, 2, 99, 30, seed=11))
    off = bad._k_off + 1 * (12 + bad.n_cells * bad.k_row_bytes)
    bad.blob[off + 4:off + 12].view(np.uint64)[0] += 2
    with pytest.raises(KVMergeError, match="refused"):
        br.replace(bad, st)
    assert br.read().n_cells == 99
    assert np.array_equal(ctx.decode(toks[-1:]), expect)


def test_failed_plan_restores_original(gqa):
    toks = prompt_tokens(80, seed=12)
    ctx = _filled(gqa, toks[:-1])
    br = KVBridge(ctx)
    expect_state = br.read()
    plan = random_plan(2, 2, 79, 20, seed=13)
    plan.src[3] = 500  # out of range: validation fails before anything is written
    with pytest.raises(ValueError, match="out of range"):
        br.compact(plan)
    assert np.array_equal(br.read().blob, expect_state.blob)


def test_parse_rejects_bad_blobs(gqa):
    toks = prompt_tokens(40, seed=14)
    ctx = _filled(gqa, toks)
    st = KVBridge(ctx).read()
    with pytest.raises(UnsupportedCacheError, match="magic"):
        parse_state(np.zeros(64, np.uint8), st.geom)
    b = st.blob.copy()
    b[st._k_off:st._k_off + 4].view(np.int32)[0] = 99
    with pytest.raises(UnsupportedCacheError, match="not supported"):
        parse_state(b, st.geom)
    with pytest.raises(UnsupportedCacheError, match="truncated"):
        parse_state(st.blob[:-100].copy(), st.geom)
    # two non-empty streams = several sequences in one blob
    two = np.concatenate([st.blob[:12], st.blob[12:], ])
    two[8:12].view(np.uint32)[0] = 2
    two = np.concatenate([two, st.blob[12:]])
    with pytest.raises(UnsupportedCacheError, match="several streams"):
        parse_state(two, st.geom)


def test_new_state_layout_roundtrips(gqa):
    ctx = _filled(gqa, prompt_tokens(33, seed=15), fa=False)
    st = KVBridge(ctx).read()
    fresh = new_state(st, st.n_cells, st.pos)
    fresh.k4[...] = st.k4
    fresh.v4[...] = st.v4
    assert np.array_equal(fresh.blob, st.blob)


def test_write_larger_than_context_is_refused(gqa):
    ctx = _filled(gqa, prompt_tokens(300, seed=16), n_ctx=512)
    st = KVBridge(ctx).read()
    small = LlamaContext(gqa, n_ctx=256, n_threads=1)
    assert small.n_ctx == 256
    with pytest.raises(KVMergeError, match="do not fit"):
        KVBridge(small).write(st)
    # compacted to fit, the same cache loads into the smaller context: memory is actually given back
    plan = random_plan(2, 2, 300, 150, seed=17)
    new = apply_plan_to_state(st, plan)
    KVBridge(small).write(new)
    assert small.n_past == 300
    assert np.isfinite(small.decode([5])).all()


def test_reused_buffers_give_the_same_compaction(gqa):
    toks = prompt_tokens(140, seed=18)
    results = []
    for reuse in (False, True):
        ctx = _filled(gqa, toks[:-1])
        br = KVBridge(ctx, reuse_buffers=reuse)
        for seed in (19, 20):  # two compactions in a row: the second reads the first's output
            st = br.read()
            new = br.compact(random_plan(2, 2, st.n_cells, st.n_cells - 30, seed=seed), st)
        results.append((new.blob.copy(), ctx.decode(toks[-1:])))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])
