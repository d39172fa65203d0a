"""Numba planning kernels vs the NumPy references (several shapes, GQA-like head counts, odd lengths)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmerge_local.kernels import reference as R
from kvmerge_local.kernels.cluster import budget_runs, threshold_runs
from kvmerge_local.kernels.merge import csr_offsets, gaussian_runs_fill
from kvmerge_local.kernels.select import pick_k, protected_mask, select_topk
from kvmerge_local.kernels.similarity import adjacent_cosine, pool1d
from kvmerge_local.kernels.strided import flat_view

SHAPES = [(1, 1, 7, 4), (2, 4, 33, 8), (3, 2, 64, 16), (1, 8, 129, 32)]


def walk_keys(rng, L, H, N, d, rho=0.8, dtype=np.float16):
    """Keys correlated along the cells (adjacent cosine ~ rho), with some exact zero vectors."""
    k = np.empty((L, H, N, d), np.float32)
    x = rng.standard_normal((L, H, d))
    for i in range(N):
        x = rho * x + np.sqrt(1 - rho * rho) * rng.standard_normal((L, H, d))
        k[:, :, i] = x
    k[:, :, rng.integers(0, N, 2)] = 0
    return k.astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_adjacent_cosine(shape, dtype):
    k = walk_keys(np.random.default_rng(0), *shape, dtype=dtype)
    got = adjacent_cosine(k)
    assert got.shape == shape[:2] + (shape[2] - 1,)
    np.testing.assert_allclose(got, R.adjacent_cosine(k), atol=2e-6)
    np.testing.assert_allclose(adjacent_cosine(np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)), got, atol=2e-6)


@pytest.mark.parametrize("ks,use_max", [(5, False), (5, True), (1, False), (4, False)])
def test_pool1d(ks, use_max):
    x = np.random.default_rng(1).random((2, 3, 40)).astype(np.float32)
    np.testing.assert_allclose(pool1d(x, 30, ks, use_max), R.pool1d(x, 30, ks, use_max), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_select_and_protect(shape):
    L, H, N, _ = shape
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, (L, H, N)).astype(np.float32)  # many ties
    scores[0, 0, 1] = np.nan
    for s, r, m in [(0, 1, 1), (1, 2, N // 2), (2, 3, N - 1)]:
        if s + r <= m:
            assert np.array_equal(select_topk(scores, s, r, m), R.select_topk(scores, s, r, m))
    k = max(0, N // 3 - 3)
    assert np.array_equal(protected_mask(scores, 1, 2, k), R.protected_mask(scores, 1, 2, k))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.integers(0, 45), st.booleans(), st.booleans())
def test_pick_k_matches_sorting(vals, k, largest, newest):
    v = np.array(vals, np.float32)
    got = pick_k(v, k, largest, newest)
    idx = np.arange(len(v))
    order = sorted(idx, key=lambda i: ((-v[i] if largest else v[i]), (-i if newest else i)))
    want = np.zeros(len(v), bool)
    want[order[:k]] = True
    assert np.array_equal(got, want)


def _runs_case(shape, seed):
    rng = np.random.default_rng(seed)
    L, H, N, d = shape
    keys = walk_keys(rng, L, H, N, d)
    ev = rng.gamma(0.5, 1.0, (L, H, N)).astype(np.float32)
    ev[..., 3:6] = 0.25  # ties
    prot = R.protected_mask(ev, min(2, N // 4), min(3, N // 3), N // 8)
    return keys, ev, prot


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.75, 0.3, 0.95])
def test_threshold_runs(shape, eps):
    keys, ev, prot = _runs_case(shape, 3)
    cos = adjacent_cosine(keys)
    N = shape[2]
    for m in sorted({int(prot[0, 0].sum()), max(int(prot.sum(-1).max()), N // 2), N - 1}):
        m = max(m, int(prot.sum(-1).max()))
        s, e = threshold_runs(cos, prot, ev, m, eps)
        rs, re = R.threshold_runs(cos, prot, ev, m, eps)
        assert np.array_equal(s, rs) and np.array_equal(e, re)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("refuse", [False, True])
def test_budget_runs(shape, refuse):
    keys, ev, prot = _runs_case(shape, 4)
    m = max(int(prot.sum(-1).max()), shape[2] // 3)
    s, e = budget_runs(keys, prot, ev, m, 0.75, refuse)
    rs, re = R.budget_runs(keys, prot, ev, m, 0.75, refuse)
    assert np.array_equal(s, rs) and np.array_equal(e, re)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sigma,rms,size", [(0.0, True, False), (5.0, False, True), (0.5, False, False)])
def test_gaussian_fill(shape, sigma, rms, size):
    keys, ev, prot = _runs_case(shape, 5)
    L, H, N, _ = shape
    m = max(int(prot.sum(-1).max()), N // 2)
    start, end = threshold_runs(adjacent_cosine(keys), prot, ev, m, 0.5)
    pos = np.broadcast_to((np.arange(N) * 3 + 7).astype(np.int32), (L, H, N))
    offsets = csr_offsets(end - start)
    nnz = int(offsets[-1, -1, -1])
    src, wk, wv = np.empty(nnz, np.int32), np.empty(nnz, np.float32), np.empty(nnz, np.float32)
    p = np.empty((L, H, m), np.int32)
    gaussian_runs_fill(*flat_view(keys), ev, pos, start, end, sigma, rms, size, offsets, src, wk, wv, p)
    ref = R.gaussian_plan(keys, ev, pos, start, end, sigma, rms, size)
    assert np.array_equal(offsets, ref.offsets) and np.array_equal(src, ref.src) and np.array_equal(p, ref.pos)
    np.testing.assert_allclose(wk, ref.wk, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(wv, ref.wv, rtol=2e-6, atol=1e-7)
