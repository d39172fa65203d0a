"""Re-indexing positions: the project's per-head RoPE re-rotation against llama.cpp's own seq_add shift."""
from __future__ import annotations

import numpy as np
import pytest

from _bridge_util import prompt_tokens, rel_err
from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel, apply_plan_to_state, float_views
from kvmerge_local.bridge.rope import RopeParams, rerotate_state_keys, segment_shifts
from kvmerge_local.methods.base import plan_from_indices

pytestmark = pytest.mark.llama

N, M = 150, 64


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    m = LlamaModel(tiny_model_factory(vocab="llama2-small", n_vocab=4096, seed=3))
    yield m
    m.close()


def test_rope_params_from_metadata(model):
    r = RopeParams.from_model(model)
    assert (r.head_dim, r.n_rot, r.freq_base, r.freq_scale, r.neox) == (64, 64, 10000.0, 1.0, False)
    with pytest.raises(ValueError):
        RopeParams(head_dim=64, n_rot=65)


@pytest.mark.parametrize("neox", [False, True])
def test_rotations_compose_and_zero_is_identity(neox):
    r = RopeParams(head_dim=64, n_rot=32, neox=neox)
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    d1, d2 = np.array([3, -7, 100, 0, 12]), np.array([-3, 7, 250, 0, 5])
    y = r.rotate(r.rotate(x.copy(), d1), d2)
    np.testing.assert_allclose(y, r.rotate(x.copy(), d1 + d2), atol=2e-4)
    np.testing.assert_array_equal(r.rotate(x.copy(), np.zeros(5, int)), x)
    np.testing.assert_array_equal(y[:, 32:], x[:, 32:])  # only n_rot dims rotate
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


def test_segment_shifts():
    assert segment_shifts([0, 1, 5, 6, 9], [0, 1, 2, 3, 4]) == [(5, 7, -3), (9, 10, -5)]
    with pytest.raises(ValueError):
        segment_shifts([0, 1], [0, 2])


def _filled(model, kv, toks):
    ctx = LlamaContext(model, n_ctx=256, n_threads=1, kv_type=kv, flash_attn=True)
    ctx.decode(toks[:N], logits="none")
    return ctx


def _ours(model, ctx, st, plan, rope):
    """Our path, the product's: ``KVBridge.compact`` applies the plan, re-rotates every head's keys to slot
    positions 0..m-1 and writes."""
    ctx.clear()
    KVBridge(ctx).write(st)
    new = KVBridge(ctx).compact(plan, st, reindex=True, rope=rope)
    np.testing.assert_array_equal(new.pos, np.arange(plan.m))


def _llamas(ctx, st, plan):
    """llama.cpp's path: apply the plan with original positions, then seq_add the gaps away."""
    ctx.clear()
    KVBridge(ctx).write(apply_plan_to_state(st, plan))
    for p0, p1, d in segment_shifts(plan.cell_positions(), np.arange(plan.m)):
        KVBridge(ctx).shift_positions(p0, p1, d)


def _keys_after_next(ctx, tok):
    logits = ctx.decode(np.array([tok], np.int32))
    assert ctx.n_past == M + 1
    st = KVBridge(ctx).read()
    return logits, np.asarray(float_views(st)[0][:, :, :M], np.float32)


# (bf16 is not compared: llama.cpp's own K-shift aborts on a bf16 cache; the engine's re-rotation handles it)
@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_uniform_reindex_matches_seq_add(model, kv):
    toks = prompt_tokens(N + 1, seed=11)
    ctx = _filled(model, kv, toks)
    st = KVBridge(ctx).read().copy()
    keep = np.r_[0:4, N - (M - 4):N]
    plan = plan_from_indices(np.broadcast_to(keep, (2, 2, M)).astype(np.int32), st.pos, N)
    rope = RopeParams.from_model(model)
    _ours(model, ctx, st, plan, rope)
    la, ka = _keys_after_next(ctx, toks[N])
    _llamas(ctx, st, plan)
    lb, kb = _keys_after_next(ctx, toks[N])
    tol = 2e-3 if kv == "f16" else 2e-2
    assert rel_err(ka, kb) < tol
    assert rel_err(la, lb) < tol
    ctx.close()


def test_per_head_reindex_matches_seq_add_head_by_head(model):
    toks = prompt_tokens(N + 1, seed=12)
    ctx = _filled(model, "f16", toks)
    st = KVBridge(ctx).read().copy()
    rng = np.random.default_rng(5)
    idx = np.stack([np.stack([np.r_[np.sort(rng.choice(N - 1, M - 1, replace=False)), N - 1] for _ in range(2)])
                    for _ in range(2)]).astype(np.int32)
    rope = RopeParams.from_model(model)
    _ours(model, ctx, st, plan_from_indices(idx, st.pos, N), rope)
    la, ours = _keys_after_next(ctx, toks[N])
    assert np.all(np.isfinite(la))
    for l in range(2):
        for h in range(2):
            uni = np.broadcast_to(idx[l, h], (2, 2, M)).astype(np.int32)
            _llamas(ctx, st, plan_from_indices(uni, st.pos, N))
            _, ref = _keys_after_next(ctx, toks[N])
            assert rel_err(ours[l, h], ref[l, h]) < 2e-3, (l, h)
    ctx.close()


def test_bf16_keys_rerotate_like_float32(model):
    toks = prompt_tokens(40, seed=13)
    ctx = LlamaContext(model, n_ctx=64, n_threads=1, kv_type="bf16", flash_attn=True)
    ctx.decode(toks, logits="none")
    st = KVBridge(ctx).read().copy()
    before = (st.k4.astype(np.uint32) << 16).view(np.float32).copy()
    delta = np.random.default_rng(1).integers(-30, 1, (2, 2, 40))
    rope = RopeParams.from_model(model)
    rerotate_state_keys(st, delta, rope)
    after = (st.k4.astype(np.uint32) << 16).view(np.float32)
    expect = rope.rotate(before.copy(), delta)
    assert rel_err(after, expect) < 1e-2  # bf16 keeps 8 bits of mantissa
    np.testing.assert_array_equal(after[delta == 0], before[delta == 0])
    ctx.close()


class _FakeModel:
    """Just what RopeParams.from_model reads: info, geom, meta(), path."""

    def __init__(self, kv: dict, rope_type: int = 0):
        from pathlib import Path

        from kvmerge_local.bridge import KVGeometry

        self.info = {"arch": "llama", "rope_type": rope_type}
        self.geom = KVGeometry(2, 2, 128)
        self.kv = kv
        self.path = Path("fake.gguf")

    def meta(self, key):
        return self.kv.get(key)


def test_rope_scaling_metadata():
    from kvmerge_local.errors import UnsupportedCacheError

    r = RopeParams.from_model(_FakeModel({"llama.rope.freq_base": "1000000.000000", "llama.rope.dimension_count": "64",
                                          "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": "4.0"}))
    assert (r.freq_base, r.n_rot, r.freq_scale, r.neox) == (1e6, 64, 0.25, False)
    assert RopeParams.from_model(_FakeModel({"llama.rope.scale_linear": "2.0"})).freq_scale == 0.5
    assert RopeParams.from_model(_FakeModel({}, rope_type=2)).neox
    with pytest.raises(UnsupportedCacheError, match="yarn"):
        RopeParams.from_model(_FakeModel({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": "4"}))
    # linear scaling: a shift by d rotates pair i by d * freq_scale * base^(-2i/n_rot)
    cos, sin = r.angles(np.array([8]))
    np.testing.assert_allclose(np.arctan2(sin, cos)[0, :3], 8 * 0.25 * 1e6 ** (-2 * np.arange(3) / 64), rtol=1e-5)


def test_rope_freqs_tensor_is_read_and_divides_the_angles(tiny_model_factory, model):
    """Llama-3.1-style GGUFs: ``rope_freqs.weight`` holds one divisor per pair (ggml: theta / ff); a model
    without the tensor has none."""
    ff = tuple(np.linspace(1.0, 8.0, 32).tolist())
    m = LlamaModel(tiny_model_factory(vocab="llama2-small", n_vocab=4096, seed=3, rope_freqs=ff))
    try:
        r = RopeParams.from_model(m)
    finally:
        m.close()
    assert r.freq_factors == pytest.approx(ff) and RopeParams.from_model(model).freq_factors is None
    cos, sin = r.angles(np.array([40]))
    theta = 40 * 10000.0 ** (-2 * np.arange(32) / 64) / np.asarray(ff)
    np.testing.assert_allclose(cos[0], np.cos(theta), atol=1e-4)
    np.testing.assert_allclose(sin[0], np.sin(theta), atol=1e-4)
    np.testing.assert_array_equal(RopeParams(head_dim=64, n_rot=64, freq_factors=(1.0,) * 32).angles(np.arange(9))[0],
                                  RopeParams(head_dim=64, n_rot=64).angles(np.arange(9))[0])  # ones: unchanged
    with pytest.raises(ValueError, match="n_rot/2"):
        RopeParams(head_dim=64, n_rot=64, freq_factors=(1.0, 2.0))
    with pytest.raises(ValueError, match="> 0"):
        RopeParams(head_dim=64, n_rot=64, freq_factors=(0.0,) * 32)
