"""Paper properties and method-specific invariants (KVMerger sets, weights, pivots; CaM keys and masks)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmerge_local
from kvmerge_local.kernels import reference as R
from kvmerge_local.methods import CaM, H2O, KVMerger, KVMergerBudget, SkipLayers, SnapKV, StreamingLLM, get_method

MERGERS = {"threshold": KVMerger, "budget": KVMergerBudget}

# -- synthetic data -------------------------------------------------------------------------------------


def run_keys(rng, lengths, d, noise=0.02):
    """Keys in runs: each run a random direction plus small noise (adjacent cosine ~1 inside, ~0 across)."""
    rows = []
    for n in lengths:
        base = rng.standard_normal(d)
        rows += [base + noise * rng.standard_normal(d) for _ in range(n)]
    return np.array(rows, np.float32)


def softmax_attn(q, K, V):
    s = K @ q.T / np.sqrt(K.shape[-1])
    a = np.exp(s - s.max(0))
    a /= a.sum(0)
    return a.T @ V, a


# -- KVMerger -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["threshold", "budget"])
def test_kvmerger_recovers_runs_of_similar_keys(mode):
    rng = np.random.default_rng(0)
    lengths = [5, 1, 7, 3, 9, 2, 4, 6, 1]  # the last run (1 cell) is the newest token
    K = run_keys(rng, lengths, 32)
    N = len(K)
    k = np.broadcast_to(K, (2, 3, N, 32)).astype(np.float16)
    v = rng.standard_normal((2, 3, N, 32)).astype(np.float16)
    meth = MERGERS[mode](n_sink=0, n_recent=1, k_top=0)
    start, end = meth.runs(k.view(np.uint16), np.ones((2, 3, N), np.float32), len(lengths))
    bounds = np.cumsum([0] + lengths)
    assert np.all(start == bounds[:-1]) and np.all(end == bounds[1:])
    plan = meth.plan(k, v, None, None, len(lengths))
    assert np.array_equal(plan.src[: N], np.arange(N))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["threshold", "budget"]), st.integers(6, 60), st.floats(0.1, 0.9))
def test_kvmerger_invariants(seed, mode, N, frac):
    rng = np.random.default_rng(seed)
    L, H, d = 2, 2, 8
    k = np.cumsum(rng.standard_normal((L, H, N, d)), 2).astype(np.float16)
    v = rng.standard_normal((L, H, N, d)).astype(np.float16)
    ev = rng.integers(0, 4, (L, H, N)).astype(np.float32)  # ties on purpose
    meth = MERGERS[mode](n_sink=2, n_recent=3, k_top=2, epsilon=0.5)
    m = max(7, int(frac * N))
    if m >= N:
        return
    plan = meth.plan(k, v, None, ev, m)
    plan.validate()
    s, r, kt = meth.counts(m)
    prot = R.protected_mask(ev, s, r, kt)
    ko = kvmerge_local.compress(k, v, ev, method=meth, budget=m)[0]
    for l in range(L):
        for h in range(H):
            seen = set()
            for j in range(m):
                a, b = plan.offsets[l, h, j], plan.offsets[l, h, j + 1]
                src = plan.src[a:b]
                assert np.array_equal(src, np.arange(src[0], src[0] + len(src))), "sets are consecutive"
                w = plan.wk[a:b]
                assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
                piv = src[np.flatnonzero(ev[l, h, src] == ev[l, h, src].max())[-1]]
                assert plan.pos[l, h, j] == piv, "pivot = largest evidence, ties newest"
                assert len(src) == 1 or not prot[l, h, src].any(), "protected cells are singletons"
                seen |= set(src.tolist())
            for i in np.flatnonzero(prot[l, h]):
                assert i in seen, "protected cells are never evicted"
                j = int(np.searchsorted(plan.pos[l, h], i))
                assert ko[l, h, j].tobytes() == k[l, h, i].tobytes(), "protected cells bit-identical"


def test_kvmerger_value_scale_size_multiplies_value_weights():
    rng = np.random.default_rng(1)
    k = np.cumsum(rng.standard_normal((1, 2, 40, 8)), 2).astype(np.float32)
    ev = rng.random((1, 2, 40)).astype(np.float32)
    a = KVMerger(epsilon=0.0).plan(k, k, None, ev, 10)
    b = KVMerger(epsilon=0.0, value_scale="size").plan(k, k, None, ev, 10)
    sizes = np.repeat(np.diff(a.offsets.reshape(2, 11), axis=1).ravel(), np.diff(a.offsets.reshape(2, 11), axis=1).ravel())
    assert np.array_equal(a.wk, b.wk)
    np.testing.assert_allclose(b.wv, a.wv * sizes, rtol=1e-6)


def test_kvmerger_skip_layers_select_there():
    rng = np.random.default_rng(2)
    k = np.cumsum(rng.standard_normal((4, 2, 60, 8)), 2).astype(np.float16)
    ev = rng.random((4, 2, 60)).astype(np.float32)
    plan = SkipLayers(base=KVMerger(epsilon=0.0, n_recent=4, window=8), layers=(0, -1)).plan(k, k, None, ev, 20)
    snap = SnapKV(window=8).plan(k[[0, 3]], k[[0, 3]], None, ev[[0, 3]], 20)
    per = np.diff(plan.offsets, axis=2)
    assert np.all(per[[0, 3]] == 1) and np.array_equal(plan.pos[[0, 3]], snap.pos)
    assert per[1:3].max() > 1


def test_kvmerger_output_error_below_eviction_on_clustered_keys():
    """Equal-size runs of near-identical keys: merging keeps the runs' value information, eviction drops it."""
    errs = {"kvmerger": [], "h2o": [], "snapkv": [], "streaming_llm": []}
    for seed in range(8):
        rng = np.random.default_rng(seed)
        R_, run, d = 24, 4, 32
        K = np.concatenate([run_keys(rng, [run] * R_, d, noise=0.05), rng.standard_normal((1, d))]).astype(np.float32)
        N = len(K)
        V = rng.standard_normal((N, d)).astype(np.float32)
        q = rng.standard_normal((8, d)).astype(np.float32)
        full, a = softmax_attn(q, K, V)
        ev = a.sum(1)[None, None].astype(np.float32)
        m = R_ + 1
        for name, meth in (("kvmerger", KVMerger(n_sink=0, n_recent=1, k_top=0)), ("h2o", H2O(n_recent=1)),
                           ("snapkv", SnapKV(window=1)), ("streaming_llm", StreamingLLM())):
            ko, vo, _ = kvmerge_local.compress(K[None, None], V[None, None], ev, method=meth, budget=m)
            out, _ = softmax_attn(q, ko[0, 0], vo[0, 0])
            errs[name].append(np.linalg.norm(out - full) / np.linalg.norm(full))
    mean = {k: float(np.mean(v)) for k, v in errs.items()}
    for name in ("h2o", "snapkv", "streaming_llm"):
        assert mean["kvmerger"] < 0.5 * mean[name], mean


# -- CaM ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [StreamingLLM(), H2O(), SnapKV(window=8)])
def test_cam_never_changes_keys_and_matches_base_selection(base):
    rng = np.random.default_rng(3)
    k = rng.standard_normal((2, 2, 50, 8)).astype(np.float16)
    v = rng.standard_normal((2, 2, 50, 8)).astype(np.float16)
    ev = rng.random((2, 2, 50)).astype(np.float32)
    cam_k, cam_v, cam_pos = kvmerge_local.compress(k, v, ev, method=CaM(base=base), budget=20)
    sel_k, sel_v, sel_pos = kvmerge_local.compress(k, v, ev, method=base, budget=20)
    assert cam_k.tobytes() == sel_k.tobytes() and np.array_equal(cam_pos, sel_pos)
    assert cam_v.tobytes() != sel_v.tobytes()


def test_cam_never_merges_when_p_is_zero():
    rng = np.random.default_rng(4)
    k = rng.standard_normal((1, 2, 40, 8)).astype(np.float32)
    ev = rng.random((1, 2, 40)).astype(np.float32) + 0.5
    base = StreamingLLM()
    keep = base.select(k, k, None, ev, 16)
    ev_zero = ev.copy()
    evicted = np.ones((1, 2, 40), bool)
    np.put_along_axis(evicted, keep.astype(np.intp), False, axis=2)
    ev_zero[evicted] = 0  # p_i = 0 for every evicted cell
    for seed in range(5):
        plan = CaM(base=base, seed=seed).plan(k, k, None, ev_zero, 16)
        assert plan.is_identity() is False and plan.src.shape[0] == 2 * 16
        assert np.all(plan.wv == 1) and np.all(plan.wk == 1)


def test_cam_seeded_and_eq14_probabilities():
    rng = np.random.default_rng(5)
    N, m = 64, 24
    k = rng.standard_normal((1, 1, N, 4)).astype(np.float32)
    ev = rng.random((1, 1, N)).astype(np.float32)
    a = CaM(seed=7, merge_budget=4).plan(k, k, None, ev, m)
    b = CaM(seed=7, merge_budget=4).plan(k, k, None, ev, m)
    assert np.array_equal(a.src, b.src) and np.array_equal(a.wv, b.wv)
    # merge frequency of one evicted cell over seeds ~ clamp(A_i / mean(A_T), 0, 1)
    keep = StreamingLLM().select(k, k, None, ev, m)[0, 0]
    i = int(np.setdiff1d(np.arange(N), keep)[3])
    j0 = int(np.searchsorted(keep, i))
    p = min(1.0, ev[0, 0, i] / ev[0, 0, keep[j0:j0 + 4]].astype(np.float64).mean())
    hits = [i in CaM(seed=s, merge_budget=4).plan(k, k, None, ev, m).src for s in range(300)]
    assert abs(np.mean(hits) - p) < 0.1


def test_cam_theorem_3_3_sampled_merges_reduce_perturbation():
    """Theorem 3.3 in the paper's perturbation model (Eq. 5, 10): output = sum_k A_k V_k with the full-cache
    attention A of the next step; eviction drops A_i V_i, CaM's sampled merges add M_i avg(A_T) V_i."""
    e_ev, e_cam = [], []
    for trial in range(20):
        rng = np.random.default_rng(100 + trial)
        N, d, m = 96, 16, 32
        K = rng.standard_normal((N, d)).astype(np.float32)
        V = (rng.standard_normal((N, d)) + 0.5).astype(np.float32)
        q = rng.standard_normal((4, d)).astype(np.float32)
        _, a = softmax_attn(q, K, V)
        A = a.sum(1).astype(np.float32)  # accumulated attention, also the next step's (stable, Fig. 2)
        full = A @ V
        for base in (StreamingLLM(), H2O()):
            keep = base.select(K[None, None], V[None, None], None, A[None, None], m)[0, 0]
            e_ev.append(np.linalg.norm(A[keep] @ V[keep] - full))
            for seed in range(5):
                plan = CaM(base=base, seed=seed).plan(K[None, None], V[None, None], None, A[None, None], m)
                Vc = R.apply_plan(V[None, None], plan, "v")[0, 0]
                e_cam.append(np.linalg.norm(A[keep] @ Vc - full))
    assert np.mean(e_cam) < 0.8 * np.mean(e_ev), (np.mean(e_cam), np.mean(e_ev))


def test_carry_evidence_follows_keys():
    rng = np.random.default_rng(6)
    k = np.cumsum(rng.standard_normal((1, 2, 30, 8)), 2).astype(np.float32)
    ev = rng.random((1, 2, 30)).astype(np.float32)
    plan = KVMerger(epsilon=0.0, n_sink=1, n_recent=2, k_top=1).plan(k, k, None, ev, 8)
    carried = plan.carry_evidence(ev)
    for h in range(2):
        for j in range(8):
            a, b = plan.offsets[0, h, j], plan.offsets[0, h, j + 1]
            assert np.isclose(carried[0, h, j], ev[0, h, plan.src[a:b]].sum())
    cam = get_method("cam+h2o").plan(k, k, None, ev, 8)
    assert np.allclose(cam.carry_evidence(ev), np.take_along_axis(ev, H2O().select(k, k, None, ev, 8).astype(np.intp), 2))
