"""f16 <-> f32 conversion inside Numba kernels is bit-identical to NumPy's astype."""
import numpy as np
import pytest
from numba import njit

from kvmerge_local.kernels.f16 import (
    HAS_F16C, as_kernel_array, f16_bits_to_f32, f16_bits_to_f32_hw, f16_bits_to_f32_soft, f16_to_f32_array,
    f32_to_f16_array, f32_to_f16_bits, f32_to_f16_bits_hw, f32_to_f16_bits_soft, store,
)


@njit(cache=True)
def _soft_both(bits, x):
    a = np.empty(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        a[i] = f16_bits_to_f32_soft(bits[i])
    b = np.empty(x.shape[0], np.uint16)
    for i in range(x.shape[0]):
        b[i] = f32_to_f16_bits_soft(x[i])
    return a, b


@njit(cache=True)
def _store_f16(x):
    out = np.empty(x.shape[0], np.uint16)
    for i in range(x.shape[0]):
        out[i] = store(x[i], out)
    return out


ALL_HALF = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def _f32_cases():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    h = ALL_HALF.view(np.float16).astype(np.float32).view(np.uint32)
    # every half value, and the points just around each halfway point (ties, just above, just below)
    return np.concatenate([x, h, h + (1 << 12), h + (1 << 12) + 1, h + (1 << 12) - 1, h + (1 << 13)]).view(np.float32)


def test_f16_to_f32_all_bit_patterns():
    ref = ALL_HALF.view(np.float16).astype(np.float32).view(np.uint32)
    assert np.array_equal(f16_to_f32_array(ALL_HALF).view(np.uint32), ref)


def test_f32_to_f16_round_half_even_subnormals_inf_nan():
    x = _f32_cases()
    with np.errstate(all="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(f32_to_f16_array(x), ref)


def test_soft_paths_match_numpy_too():
    x = _f32_cases()
    a, b = _soft_both(ALL_HALF, x)
    with np.errstate(all="ignore"):
        assert np.array_equal(b, x.astype(np.float16).view(np.uint16))
    assert np.array_equal(a.view(np.uint32), ALL_HALF.view(np.float16).astype(np.float32).view(np.uint32))


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", ARM "Features"); None when unreadable."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return None


def test_hardware_path_follows_the_cpu():
    """F16C is detected exactly when the CPU has it (through LLVM's host features), and then the kernels run
    the hardware conversions, otherwise the integer ones (the module-level choice the kernels compile in)."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo feature flags to compare with")
    assert HAS_F16C == ("f16c" in flags)
    assert (f16_bits_to_f32 is f16_bits_to_f32_hw) == HAS_F16C
    assert (f32_to_f16_bits is f32_to_f16_bits_hw) == HAS_F16C
    assert (f16_bits_to_f32 is f16_bits_to_f32_soft) != HAS_F16C


def test_store_saturates_merges_to_finite_half():
    x = np.array([1e6, -1e6, 65504, 65519, 65520, np.inf, 1.5], np.float32)
    out = _store_f16(x).view(np.float16)
    assert list(out[:6]) == [65504, -65504, 65504, 65504, 65504, 65504]
    assert out[6] == 1.5


def test_as_kernel_array_views_without_copy():
    a = np.zeros((2, 3), np.float16)[:, ::2]
    v = as_kernel_array(a)
    assert v.dtype == np.uint16 and np.shares_memory(v, a) and v.strides == a.strides
    with pytest.raises(ValueError):
        as_kernel_array(np.zeros(3, np.float64))
