"""apply_plan: parity with the NumPy reference for any strides, copies bit-exact, merges rounded once."""
import numpy as np
import pytest

from kvmerge_local.kernels import reference as R
from kvmerge_local.kernels.apply import apply_plan, apply_plan_keys, apply_plan_values
from kvmerge_local.kernels.strided import flat_view
from kvmerge_local.plan import Plan


def random_plan(rng, L, H, N, m, max_src=4, p_copy=0.5):
    """A random well-formed plan mixing copy slots and merge slots (some zero weights)."""
    counts = np.where(rng.random((L, H, m)) < p_copy, 1, rng.integers(1, max_src + 1, (L, H, m)))
    cs = np.concatenate([[0], np.cumsum(counts.ravel())])
    offsets = cs[np.arange(L * H)[:, None] * m + np.arange(m + 1)].reshape(L, H, m + 1).astype(np.int64)
    nnz = int(cs[-1])
    src = rng.integers(0, N, nnz).astype(np.int32)
    wk = rng.standard_normal(nnz).astype(np.float32)
    wv = rng.random(nnz).astype(np.float32)
    single = np.repeat(counts.ravel() == 1, counts.ravel())
    wk[single] = 1
    wv[single] = 1
    wk[rng.random(nnz) < 0.1] = 0
    pos = np.broadcast_to(np.arange(m, dtype=np.int32), (L, H, m)).copy()
    plan = Plan(N, offsets, src, wk, wv, pos)
    plan.validate()
    return plan


def layouts(rng, L, H, N, d, dtype):
    base = (rng.standard_normal((L, H, N, d)) * 3).astype(dtype)
    yield "contiguous", base
    yield "transposed", np.ascontiguousarray(base.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    yield "llama-K", np.ascontiguousarray(base.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    big = np.zeros((L, H + 1, N, d + 3), dtype)
    big[:, 1:, :, 1:d + 1] = base
    yield "padded", big[:, 1:, :, 1:d + 1]
    yield "negative", base[:, ::-1, ::-1].copy()[:, ::-1, ::-1]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(1, 1, 5, 4), (2, 3, 17, 8), (3, 2, 33, 16)])
def test_parity_with_reference(dtype, shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    L, H, N, d = shape
    m = max(1, N // 2)
    plan = random_plan(rng, L, H, N, m)
    for name, src in layouts(rng, L, H, N, d, dtype):
        for which in "kv":
            ref = R.apply_plan(src, plan, which)
            for dst in (np.empty((L, H, m, d), dtype), np.empty((L, H, d, m), dtype).transpose(0, 1, 3, 2)):
                apply_plan(src, dst, plan, which)
                assert np.ascontiguousarray(dst).tobytes() == ref.tobytes(), (name, which)


def test_copies_are_raw_bits_even_for_nan_payloads():
    L, H, N, d = 1, 2, 6, 4
    bits = np.random.default_rng(1).integers(0, 65536, (L, H, N, d)).astype(np.uint16)
    bits[0, 0, 0, 0] = 0x7C01  # signalling NaN
    src = bits.view(np.float16)
    idx = np.array([[[0, 2, 5], [1, 3, 5]]], np.int32)
    plan = Plan(N, (np.arange(2)[:, None] * 3 + np.arange(4)).reshape(1, 2, 4).astype(np.int64), idx.ravel(),
                np.ones(6, np.float32), np.ones(6, np.float32), np.broadcast_to(np.arange(3, dtype=np.int32), (1, 2, 3)).copy())
    dst = np.empty((L, H, 3, d), np.float16)
    apply_plan_keys(src, dst, plan)
    assert np.array_equal(dst.view(np.uint16), np.take_along_axis(bits, idx[..., None].astype(np.intp), 2))


def test_zero_weight_sources_are_skipped_so_keys_stay_exact():
    src = np.array([[[[1.1, -2.3], [np.inf, np.nan]]]], np.float16)
    plan = Plan(2, np.array([[[0, 2]]], np.int64), np.array([0, 1], np.int32), np.array([1, 0], np.float32),
                np.array([1, 0.5], np.float32), np.array([[[0]]], np.int32))
    k = apply_plan_keys(src, np.empty((1, 1, 1, 2), np.float16), plan)
    assert np.array_equal(k.view(np.uint16), src[:, :, :1].view(np.uint16))
    v = apply_plan_values(src, np.empty((1, 1, 1, 2), np.float16), plan)
    assert np.isinf(v[0, 0, 0, 0]) is np.False_ and np.isnan(v[0, 0, 0, 1])


def test_merge_saturates_instead_of_overflowing():
    src = np.full((1, 1, 2, 3), 60000, np.float16)
    plan = Plan(2, np.array([[[0, 2]]], np.int64), np.array([0, 1], np.int32), np.ones(2, np.float32),
                np.ones(2, np.float32), np.array([[[1]]], np.int32))
    out = apply_plan_values(src, np.empty((1, 1, 1, 3), np.float16), plan)
    assert np.all(out == np.float16(65504))


def test_errors():
    plan = random_plan(np.random.default_rng(0), 1, 1, 4, 2)
    src = np.zeros((1, 1, 4, 2), np.float32)
    with pytest.raises(ValueError):
        apply_plan(src, np.zeros((1, 1, 3, 2), np.float32), plan)
    with pytest.raises(ValueError):
        apply_plan(src, np.zeros((1, 1, 2, 2), np.float16), plan)
    with pytest.raises(ValueError):
        apply_plan(src, np.zeros((1, 1, 2, 2), np.float32), plan, "x")
    with pytest.raises(ValueError):
        apply_plan(src.astype(np.float64), np.zeros((1, 1, 2, 2), np.float64), plan)


def test_flat_view_geometry():
    a = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)[:, ::-1, 1:, ::2]
    flat, g = flat_view(a)
    for idx in np.ndindex(a.shape):
        l, h, i, e = idx
        assert flat[g[0] + l * g[1] + h * g[2] + i * g[3] + e * g[4]] == a[idx]
