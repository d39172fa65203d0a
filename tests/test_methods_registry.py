"""Every registered method: plan invariants, parity with the NumPy reference planner, identity, API errors."""
import dataclasses

import numpy as np
import pytest

import kvmerge_local
from kvmerge_local.kernels import reference as R
from kvmerge_local.kernels.apply import apply_plan
from kvmerge_local.methods import (
    REGISTRY, CaM, H2O, KVMerger, KVMergerBudget, SkipLayers, SnapKV, StreamingLLM, TOVA, describe_methods, get_method, resolve_budget,
)
from kvmerge_local.methods.reference import reference_plan

NAMES = sorted(REGISTRY)
KINDS = {"none", "window", "all", "last", "reconstruct"}


def make_inputs(L=2, H=3, N=41, d=8, seed=0, dtype=np.float16, transposed_v=True):
    rng = np.random.default_rng(seed)
    k = np.cumsum(rng.standard_normal((L, H, N, d)), axis=2).astype(dtype)  # neighbours similar
    v = rng.standard_normal((L, H, d, N)).astype(dtype)
    v = v.transpose(0, 1, 3, 2) if transposed_v else np.ascontiguousarray(v.transpose(0, 1, 3, 2))
    ev = rng.gamma(0.5, 1.0, (L, H, N)).astype(np.float32)
    pos = (np.arange(N) * 2 + 5).astype(np.int32)
    return k, v, ev, pos


def plan_of(name, k, v, ev, pos, m):
    meth = REGISTRY[name]
    return meth.plan(k, v, pos, ev if meth.evidence_kind != "none" else None, m)


def test_registry_names_and_evidence_declarations():
    for name in ["full", "streaming_llm", "h2o", "snapkv", "tova", "cam+streaming_llm", "cam+snapkv", "cam+h2o",
                 "kvmerger", "kvmerger+size"]:
        assert name in REGISTRY
    for name, meth in REGISTRY.items():
        assert meth.evidence_kind in KINDS, name
        assert isinstance(meth.window, int)
    assert REGISTRY["snapkv"].evidence_kind == "window" and REGISTRY["snapkv"].window == 32
    assert REGISTRY["h2o"].evidence_kind == "all" and REGISTRY["tova"].evidence_kind == "last"
    assert REGISTRY["cam+streaming_llm"].evidence_kind == "all"
    assert REGISTRY["cam+snapkv"].evidence_kind == "window"
    assert REGISTRY["kvmerger"].evidence_kind == "window"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,m", [((2, 3, 41, 8), 20), ((1, 4, 17, 4), 1), ((2, 2, 64, 16), 40), ((1, 1, 9, 4), 8)])
def test_invariants_and_reference_parity(name, shape, m):
    k, v, ev, pos = make_inputs(*shape)
    L, H, N, d = shape
    plan = plan_of(name, k, v, ev, pos, m)
    plan.validate()
    want_m = N if name == "full" else m
    assert plan.pos.shape == (L, H, want_m)
    assert np.all(plan.pos[..., -1] == pos[-1]), "newest token kept in every (layer, head)"
    assert np.all(np.isin(plan.pos, pos))
    ref = reference_plan(REGISTRY[name], k, v, pos, ev if REGISTRY[name].evidence_kind != "none" else None, want_m)
    assert np.array_equal(plan.offsets, ref.offsets) and np.array_equal(plan.src, ref.src)
    assert np.array_equal(plan.pos, ref.pos)
    np.testing.assert_allclose(plan.wk, ref.wk, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(plan.wv, ref.wv, rtol=2e-6, atol=1e-7)
    for which, x in (("k", k), ("v", v)):
        out = apply_plan(x, np.empty((L, H, want_m, d), x.dtype), plan, which)
        assert np.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_identity_when_budget_covers_everything(name):
    k, v, ev, pos = make_inputs(N=12)
    for m in (12, 13, 1000):
        plan = plan_of(name, k, v, ev, pos, m)
        assert plan.is_identity()
    ko, vo, po = kvmerge_local.compress(k, v, ev, method=name, budget=1.0, positions=pos)
    assert ko.tobytes() == np.ascontiguousarray(k).tobytes() and vo.tobytes() == np.ascontiguousarray(v).tobytes()
    assert np.array_equal(po, np.broadcast_to(pos, po.shape))


@pytest.mark.parametrize("name", NAMES)
def test_extremes_and_zero_vectors_stay_finite(name):
    k, v, ev, pos = make_inputs(N=30, d=8)
    k = k.copy()
    v = np.ascontiguousarray(v)
    k[:, :, ::3] = 0
    k[:, :, 1::3] = np.float16(65504)
    k[:, :, 2::5] = np.float16(-65504)
    v[:, :, ::2] = np.float16(65504)
    v[:, :, 1::4] = np.float16(6e-8)  # subnormal
    ev[:, :, ::4] = 0
    ko, vo, _ = kvmerge_local.compress(k, v, ev, method=name, budget=10)
    assert np.isfinite(ko).all() and np.isfinite(vo).all()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    k, v, ev, pos = make_inputs(seed=3)
    a = plan_of(name, k, v, ev, pos, 15)
    b = plan_of(name, k.copy(), v.copy(), ev.copy(), pos, 15)
    for f in ("offsets", "src", "wk", "wv", "pos"):
        assert np.array_equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_gqa_shapes(name):
    k, v, ev, pos = make_inputs(L=3, H=8, N=50, d=4, dtype=np.float32, transposed_v=False)
    ko, vo, po = kvmerge_local.compress(k, v, ev, method=name, budget=0.3, positions=pos)
    m = 50 if name == "full" else 15
    assert ko.shape == (3, 8, m, 4) and vo.shape == (3, 8, m, 4) and po.shape == (3, 8, m)
    assert ko.dtype == np.float32 and np.all(np.diff(po, axis=-1) > 0)


def test_resolve_budget():
    assert resolve_budget(0.5, 4096) == 2048
    assert resolve_budget(1.0, 7) == 7 and resolve_budget(1, 7) == 1 and resolve_budget(100, 7) == 7
    assert resolve_budget(0.01, 10) == 1 and resolve_budget(np.int64(3), 10) == 3
    for bad in (0, -1, 0.0, 1.5, -0.2, True, "0.5", None, float("nan")):
        with pytest.raises(ValueError):
            resolve_budget(bad, 10)


def test_get_method_overrides_and_errors():
    m = get_method("kvmerger", epsilon=0.5, sigma=5.0)
    assert isinstance(m, KVMerger) and m.epsilon == 0.5 and m.sigma == 5.0
    assert REGISTRY["kvmerger"].epsilon == 0.75, "registry entry untouched"
    c = get_method("cam+snapkv", window=16, seed=3)
    assert isinstance(c, CaM) and c.base.window == 16 and c.seed == 3 and c.evidence_kind == "window"
    with pytest.raises(ValueError):
        get_method("nope")
    with pytest.raises(ValueError):
        get_method("h2o", epsilon=0.3)
    with pytest.raises(ValueError):
        get_method("kvmerger", mode="fast")
    with pytest.raises(ValueError):
        get_method("kvmerger", refuse_below_epsilon=True)  # a parameter of the budget variant only
    b = get_method("kvmerger+budget", refuse_below_epsilon=True, k_top=3)
    assert type(b) is KVMergerBudget and b.refuse_below_epsilon and b.k_top == 3
    sk = get_method("kvmerger+skip", epsilon=0.4, layers=(0,))
    assert isinstance(sk, SkipLayers) and sk.layers == (0,) and sk.base.epsilon == 0.4 and sk.window == 32
    assert REGISTRY["kvmerger+skip"].base.epsilon == 0.75 and REGISTRY["kvmerger+skip"].layers == (0, 1, -1)
    with pytest.raises(ValueError):
        get_method("kvmerger+skip", pooling="max")  # neither SkipLayers' nor KVMerger's


@pytest.mark.parametrize("cls,kw", [
    (KVMerger, {"epsilon": 2.0}), (KVMerger, {"sigma": -1.0}), (KVMerger, {"sigma": "auto"}),
    (KVMerger, {"value_scale": "x"}), (KVMerger, {"k_top": -1}), (KVMerger, {"k_top": 1.5}),
    (SkipLayers, {"layers": ("a",)}), (KVMerger, {"evidence": "last"}), (KVMerger, {"n_recent": 0}),
    (KVMergerBudget, {"refuse_below_epsilon": 1}), (KVMergerBudget, {"epsilon": -1.5}),
    (SkipLayers, {"base": KVMerger(evidence="none")}), (SkipLayers, {"base": SkipLayers()}), (SkipLayers, {"base": "kvmerger"}),
    (SnapKV, {"window": 0}), (SnapKV, {"pooling": "median"}), (H2O, {"n_recent": 0}), (StreamingLLM, {"n_sink": -1}),
    (TOVA, {"n_sink": 1.5}), (CaM, {"merge_budget": 0}), (CaM, {"base": KVMerger()}), (CaM, {"seed": -1}),
])
def test_parameter_validation(cls, kw):
    with pytest.raises(ValueError):
        cls(**kw)


def test_describe_methods():
    rows = describe_methods()
    assert [r["name"] for r in rows] == list(REGISTRY)
    kv = next(r for r in rows if r["name"] == "kvmerger")
    assert kv["params"]["epsilon"] == 0.75 and kv["evidence_kind"] == "window" and kv["doc"]
    cam = next(r for r in rows if r["name"] == "cam+snapkv")
    assert "SnapKV" in cam["params"]["base"]


def test_compress_errors():
    k, v, ev, pos = make_inputs()
    with pytest.raises(ValueError):
        kvmerge_local.compress(k[0], v, ev)
    with pytest.raises(ValueError):
        kvmerge_local.compress(k, v[:, :, :5], ev)
    with pytest.raises(ValueError):
        kvmerge_local.compress(k.astype(np.float64), v, ev)
    with pytest.raises(ValueError):
        kvmerge_local.compress(k, v, ev[:, :, :5])
    with pytest.raises(ValueError):
        kvmerge_local.compress(k, v, ev, budget=0)
    with pytest.raises(ValueError):
        kvmerge_local.compress(k, v, np.full_like(ev, np.nan))
    with pytest.raises(ValueError):
        kvmerge_local.compress(k, v, ev, positions=pos[::-1].copy())
    with pytest.raises(ValueError):
        kvmerge_local.compress(k, v, None, method="h2o")
    with pytest.raises(ValueError):
        kvmerge_local.compress(k, v, ev, method="kvmerger", bogus=1)


def test_compress_matches_plan_and_reference_apply():
    k, v, ev, pos = make_inputs(seed=5)
    ko, vo, po = kvmerge_local.compress(k, v, ev, method="kvmerger+size", budget=0.5, positions=pos)
    plan = reference_plan(REGISTRY["kvmerger+size"], k, v, pos, ev, resolve_budget(0.5, k.shape[2]))
    assert np.array_equal(po, plan.pos)
    assert ko.tobytes() == R.apply_plan(k, plan, "k").tobytes()
    assert vo.tobytes() == R.apply_plan(v, plan, "v").tobytes()
    ko2, _, _ = kvmerge_local.compress(k, v, method=dataclasses.replace(REGISTRY["kvmerger"], value_scale="size"),
                                       budget=0.5, evidence=ev, positions=pos)
    assert ko2.tobytes() == ko.tobytes()


def test_kvmerger_without_evidence_works():
    k, v, _, _ = make_inputs()
    ko, vo, po = kvmerge_local.compress(k, v, method="kvmerger+budget")
    assert ko.shape[2] == 20 and np.isfinite(vo).all()


def test_default_method_offline_needs_its_replay_scores():
    """compress() uses DEFAULT_METHOD (KVzip): without a model there are no replay scores -- a clear error."""
    k, v, _, _ = make_inputs()
    with pytest.raises(ValueError, match="replaying the document on the model.*kvmerger\\+budget"):
        kvmerge_local.compress(k, v)
    ev = np.random.default_rng(0).random(k.shape[:3], dtype=np.float32)
    ko, _, _ = kvmerge_local.compress(k, v, ev)
    assert ko.shape[2] == 20
