"""Bit-exactness of kvmerge_local.codec against ggml itself (called through ctypes) and against numpy.

ggml is reached through tests/support/ggml_ctypes.py (libraries from LLAMA_CPP_LIB_PATH or the installed
llama_cpp package); the ggml tests skip when neither has them. The numpy-only tests always run.
"""
from __future__ import annotations

import logging
import platform
import sys

import numpy as np
import pytest

from kvmerge_local import codec
from kvmerge_local.codec import (GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0)
from support.ggml_ctypes import ggml  # noqa: F401 - the fixture

log = logging.getLogger(__name__)

IS_X86 = platform.machine().lower() in ("x86_64", "amd64")



# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------

def _edge_blocks(rng: np.random.Generator) -> np.ndarray:
    """float32[n_blocks, 32] of hand-made edge cases for block quantizers (no NaN, no inf)."""
    f32 = np.float32
    blocks = [np.zeros(32, f32), np.full(32, -0.0, f32)]
    one = np.zeros(32, f32)
    one[7] = -3.0
    blocks.append(one)                                               # single nonzero, negative max-abs
    for scale in (f32(3.4028235e38), f32(1e38), f32(1e-30), f32(1.1754944e-38), f32(1e-40), f32(1.4e-45),
                  f32(6e-8), f32(65504.0), f32(70000.0), f32(1e6)):
        b = rng.standard_normal(32).astype(f32)
        b = (b / np.abs(b).max() * scale).astype(f32)
        blocks.append(b)
        blocks.append(-b)
    for e in (-20, -3, 0, 5, 20):                                    # exact rounding midpoints
        s = f32(2.0) ** e
        b = (rng.integers(-127, 127, 32) + 0.5).astype(f32)
        b[0] = 127.0
        blocks.append(b * s)
        b2 = (rng.integers(-8, 8, 32) + 0.5).astype(f32)             # q4_0: d = max/-8 = 1 -> x*id+8.5 integers
        b2[0] = -8.0
        blocks.append(b2 * s)
        b3 = rng.integers(-8, 9, 32).astype(f32) / f32(2.0)
        b3[3] = 8.0
        b3[9] = -8.0                                                 # tie of max-abs with opposite signs
        blocks.append(b3 * s)
    b = np.full(32, 1.0, f32)
    b[5] = -1.0                                                      # first max-abs positive, others tie
    blocks.append(b)
    b = np.linspace(-1, 1, 32).astype(f32)
    blocks.append(b)
    return np.stack(blocks)


def _random_rows(rng: np.random.Generator, n_rows: int, n_elems: int) -> np.ndarray:
    x = rng.standard_normal((n_rows, n_elems)).astype(np.float32)
    blk = (10.0 ** rng.uniform(-6, 6, (n_rows, n_elems // 32, 1))).astype(np.float32)
    return (x.reshape(n_rows, -1, 32) * blk).reshape(n_rows, n_elems).astype(np.float32)


def _rows_with_edges(rng, n_rows=48, n_elems=256) -> np.ndarray:
    edge = _edge_blocks(rng).reshape(-1)
    pad = (-edge.size) % n_elems
    edge = np.concatenate([edge, np.zeros(pad, np.float32)]).reshape(-1, n_elems)
    return np.ascontiguousarray(np.concatenate([edge, _random_rows(rng, n_rows, n_elems)]))


def _is_snan32(x: np.ndarray) -> np.ndarray:
    u = x.view(np.uint32)
    return ((u & 0x7F800000) == 0x7F800000) & ((u & 0x007FFFFF) != 0) & ((u & 0x00400000) == 0)


# ----------------------------------------------------------------------------------------------------------------
# numpy-only tests
# ----------------------------------------------------------------------------------------------------------------

def test_type_ids_and_row_sizes():
    assert (GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_BF16) == (0, 1, 2, 8, 30)
    assert codec.row_bytes(GGML_TYPE_Q8_0, 1024) == 32 * 34
    assert codec.row_bytes(GGML_TYPE_Q4_0, 128) == 4 * 18
    assert codec.n_elems_of_row(GGML_TYPE_Q8_0, 34 * 4) == 128
    with pytest.raises(ValueError):
        codec.row_bytes(GGML_TYPE_Q8_0, 48)
    with pytest.raises(ValueError):
        codec.row_bytes(12, 32)


def test_f16_to_f32_all_patterns_match_numpy():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = codec.f16_bits_to_f32_array(h).view(np.uint32)
    ref = h.view(np.float16).astype(np.float32).view(np.uint32)
    snan = ((h & 0x7C00) == 0x7C00) & ((h & 0x3FF) != 0) & ((h & 0x200) == 0)
    np.testing.assert_array_equal(ours[~snan], ref[~snan])
    np.testing.assert_array_equal(ours[snan], ref[snan] | 0x00400000)  # ggml quiets signalling NaNs


def test_f32_to_f16_matches_numpy_incl_edges():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2 ** 32, 300_000, dtype=np.uint64).astype(np.uint32)
    # every f16 value, the midpoints between neighbours and +-1 ulp around them (round-half-even), specials
    h = np.arange(0, 0x7C01, dtype=np.uint32).astype(np.uint16)
    v = h.view(np.float16).astype(np.float64)
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32).view(np.uint32)
    special = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x477FF000,
                        0x477FEFFF, 0x33000000, 0x33000001, 0x387FE000, 0x00000001, 0x7F7FFFFF], np.uint32)
    allb = np.concatenate([bits, mids, mids + 1, mids - 1, h.view(np.float16).astype(np.float32).view(np.uint32),
                           special])
    allb = np.concatenate([allb, allb | np.uint32(0x80000000)])
    x = allb.view(np.float32)
    ours = codec.f32_to_f16_bits_array(x)
    with np.errstate(all="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    ok = ~_is_snan32(x)
    np.testing.assert_array_equal(ours[ok], ref[ok])


def test_bf16_arrays_are_the_row_codec_and_ggml_rounding():
    """The one bf16 conversion (codec) on arrays of any shape and strides: bit-identical to the bf16 row codec
    (checked against ggml below), round-half-even by hand, NaNs kept NaN."""
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2 ** 32, 20_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2 ** 16, 4096, dtype=np.uint32) << 16) | np.uint32(0x8000)  # exact midpoints
    x = np.concatenate([bits, ties, ties + 1, ties - 1]).view(np.float32).reshape(-1, 32)
    ours = codec.f32_to_bf16_bits_array(x)
    assert ours.shape == x.shape and ours.dtype == np.uint16
    np.testing.assert_array_equal(ours.view(np.uint8), codec.quantize_rows(x, GGML_TYPE_BF16))
    u = x.view(np.uint32).astype(np.uint64)
    rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], rne[~nan])
    assert np.isnan(codec.bf16_bits_to_f32_array(ours[nan])).all()
    back = codec.bf16_bits_to_f32_array(ours.T)  # a strided view
    assert back.shape == ours.T.shape
    np.testing.assert_array_equal(back.view(np.uint32), ours.T.astype(np.uint32) << 16)
    np.testing.assert_array_equal(codec.bf16_bits_to_f32_array(ours),
                                  codec.dequantize_rows(ours.view(np.uint8), GGML_TYPE_BF16))


def test_roundtrip_and_views():
    rng = np.random.default_rng(2)
    x = _random_rows(rng, 20, 256)
    for t in (GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0):
        q = codec.quantize_rows(x, t)
        assert q.shape == (20, codec.row_bytes(t, 256)) and q.dtype == np.uint8
        # a read-only, unaligned, strided view of a bigger buffer (as from a state blob) decodes the same
        buf = np.zeros(q.size * 2 + 64, np.uint8)
        view = np.lib.stride_tricks.as_strided(buf[1:], shape=q.shape, strides=(q.shape[1] + 3, 1))
        view[...] = q
        view.flags.writeable = False
        np.testing.assert_array_equal(codec.dequantize_rows(view, t).view(np.uint32),
                                      codec.dequantize_rows(q, t).view(np.uint32))
        # requantizing decoded rows is stable (when block scales are normal f16 numbers)
        x1 = rng.standard_normal((8, 256)).astype(np.float32)
        q1 = codec.quantize_rows(x1, t)
        np.testing.assert_array_equal(codec.quantize_rows(codec.dequantize_rows(q1, t), t), q1)
        y = codec.dequantize_rows(q, t)
        if t == GGML_TYPE_F32:
            np.testing.assert_array_equal(y, x)


def test_gather_scatter_and_heads_match_whole_rows():
    rng = np.random.default_rng(3)
    n_rows, n_head, hd = 40, 4, 64
    x = _random_rows(rng, n_rows, n_head * hd)
    for t in (GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0):
        q = codec.quantize_rows(x, t)
        full = codec.dequantize_rows(q, t)
        rows = rng.permutation(n_rows)[:17]
        np.testing.assert_array_equal(codec.dequantize_rows_at(q, t, rows), full[rows])
        dst = np.full_like(q, 0xAB)
        codec.quantize_rows_at(x[rows], t, rows, dst)
        np.testing.assert_array_equal(dst[rows], q[rows])
        untouched = np.setdiff1d(np.arange(n_rows), rows)
        assert (dst[untouched] == 0xAB).all()
        idx = rng.integers(0, n_rows, (n_head, 9))                  # per-head cell selections
        hrows, heads = idx.ravel(), np.repeat(np.arange(n_head), 9)
        got = codec.dequantize_heads_at(q, t, hd, hrows, heads).reshape(n_head, 9, hd)
        want = full.reshape(n_rows, n_head, hd)[idx, np.arange(n_head)[:, None]]
        np.testing.assert_array_equal(got, want)
        # scatter every (row, head) once in random order == whole-row encoding
        pairs = rng.permutation(n_rows * n_head)
        dst = np.zeros_like(q)
        codec.quantize_heads_at(x.reshape(-1, hd)[pairs], t, hd, pairs // n_head, pairs % n_head, dst)
        np.testing.assert_array_equal(dst, q)
    with pytest.raises(IndexError):
        codec.dequantize_rows_at(q, GGML_TYPE_Q4_0, [n_rows])
    with pytest.raises(ValueError):
        codec.dequantize_heads_at(q, GGML_TYPE_Q4_0, 48, [0], [0])


def test_q8_variants_differ_only_in_rounding():
    """The three q8_0 roundings agree on generic data and differ on exact midpoints (documented behaviour)."""
    f32 = np.float32
    x = np.zeros((1, 32), f32)
    x[0, 0] = 127.0
    x[0, 1] = 2.5     # id == 1 exactly: x86/NEON round half to even -> 2, ref rounds away -> 3
    x[0, 2] = -3.5    # -> -4 with both rules
    codes = {v: codec.quantize_rows(x, GGML_TYPE_Q8_0, q8_variant=v)[0, 2:5].view(np.int8).tolist()
             for v in (codec.Q8_VARIANT_X86, codec.Q8_VARIANT_NEON, codec.Q8_VARIANT_REF)}
    assert codes[codec.Q8_VARIANT_X86] == [127, 2, -4]
    assert codes[codec.Q8_VARIANT_NEON] == [127, 2, -4]
    assert codes[codec.Q8_VARIANT_REF] == [127, 3, -4]


# ----------------------------------------------------------------------------------------------------------------
# ggml parity
# ----------------------------------------------------------------------------------------------------------------

def test_ggml_type_names_and_row_sizes(ggml):
    for t, name in ((0, b"f32"), (1, b"f16"), (2, b"q4_0"), (8, b"q8_0"), (30, b"bf16")):
        assert ggml.base.ggml_type_name(t) == name
        assert codec.type_name(t) == name.decode()
        for n in (32, 128, 1024):
            assert codec.row_bytes(t, n) == ggml.base.ggml_row_size(t, n)


@pytest.mark.parametrize("type_id", [GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_F16, GGML_TYPE_BF16])
def test_quantize_matches_cpu_from_float(ggml, type_id):
    """Our encoder == ggml_get_type_traits_cpu(type)->from_float, the function ggml_set_rows uses."""
    rng = np.random.default_rng(10 + type_id)
    x = _rows_with_edges(rng)
    if type_id in (GGML_TYPE_F16, GGML_TYPE_BF16):  # any bit pattern incl. inf/NaN/subnormals
        x = np.concatenate([x, rng.integers(0, 2 ** 32, (64, 256), dtype=np.uint64).astype(np.uint32)
                            .view(np.float32)])
    elif type_id == GGML_TYPE_Q8_0 and IS_X86:
        inf_rows = np.zeros((2, 256), np.float32)
        inf_rows[0, 3], inf_rows[1, 40], inf_rows[1, 41] = np.inf, -np.inf, 1.0
        x = np.concatenate([x, inf_rows])
    want = ggml.from_float_cpu(type_id, x)
    got = codec.quantize_rows(x, type_id)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("type_id", [GGML_TYPE_Q8_0, GGML_TYPE_Q4_0])
def test_ref_variant_matches_ggml_quantize_chunk(ggml, type_id):
    """ggml_quantize_chunk runs quantize_row_*_ref; for q4_0 that is also the CPU from_float, for q8_0 it is
    Q8_VARIANT_REF, which on x86 differs from the cache store (midpoints, and blocks whose amax/127 underflows)."""
    rng = np.random.default_rng(20 + type_id)
    x = _rows_with_edges(rng)
    want = ggml.quantize_chunk(type_id, x)
    got = codec.quantize_rows(x, type_id, q8_variant=codec.Q8_VARIANT_REF)
    np.testing.assert_array_equal(got, want)
    if type_id == GGML_TYPE_Q8_0 and IS_X86:
        cpu = ggml.from_float_cpu(type_id, x)
        n_diff = int((cpu != want).any(axis=1).sum())
        log.info("q8_0: ggml_quantize_chunk (ref) and CPU from_float differ on %d of %d rows", n_diff, len(x))
        assert n_diff > 0  # the edge rows include midpoints, where roundf and round-half-even disagree


@pytest.mark.parametrize("type_id", [GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_F16, GGML_TYPE_BF16])
def test_dequantize_matches_to_float(ggml, type_id):
    """Our decoder == ggml_get_type_traits(type)->to_float on random bytes (any scale bits, incl. inf/NaN)."""
    rng = np.random.default_rng(30 + type_id)
    n_elems = 256
    raw = rng.integers(0, 256, (300, codec.row_bytes(type_id, n_elems)), dtype=np.uint8)
    raw = np.concatenate([raw, codec.quantize_rows(_rows_with_edges(rng), type_id)])
    want = ggml.to_float(type_id, raw, n_elems)
    got = codec.dequantize_rows(raw, type_id)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# ----------------------------------------------------------------------------------------------------------------
# Hadamard rotation
# ----------------------------------------------------------------------------------------------------------------

def _gen_hadamard_transcription(n: int) -> np.ndarray:
    """Line-by-line numpy transcription of ggml_gen_hadamard (src/llama-kv-cache.cpp)."""
    data = np.zeros(n * n, np.float32)
    data[0] = np.float32(1.0 / float(np.sqrt(np.float32(n))))   # data[0*n + 0] = 1.0 / sqrtf(n);
    s = 1
    while s < n:
        for i in range(s):
            for j in range(s):
                val = data[i * n + j]
                data[(i + s) * n + j] = val
                data[i * n + (j + s)] = val
                data[(i + s) * n + (j + s)] = -val
        s *= 2
    return data.reshape(n, n)


def test_rot_size():
    assert [codec.rot_size(d, "k") for d in (64, 128, 192, 256, 320, 512, 96, 80)] == [64, 128, 64, 256, 64, 512,
                                                                                        0, 0]
    assert [codec.rot_size(d, "v") for d in (64, 128, 256, 96)] == [64, 64, 64, 0]
    assert codec.cache_rot_size(GGML_TYPE_Q8_0, 128, "k", environ={}) == 128
    assert codec.cache_rot_size(GGML_TYPE_Q4_0, 128, "v", environ={}) == 64
    assert codec.cache_rot_size(GGML_TYPE_F16, 128, "k", environ={}) == 0
    assert codec.cache_rot_size(GGML_TYPE_Q8_0, 128, "k", environ={"LLAMA_ATTN_ROT_DISABLE": "1"}) == 0
    assert codec.cache_rot_size(GGML_TYPE_Q8_0, 128, "k", environ={"LLAMA_ATTN_ROT_DISABLE": "0"}) == 128


@pytest.mark.parametrize("n", [64, 128, 256])
def test_hadamard_matrix_identical_to_ggml_gen_hadamard(n):
    h = codec.hadamard_matrix(n)
    np.testing.assert_array_equal(h.view(np.uint32), _gen_hadamard_transcription(n).view(np.uint32))
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(h.astype(np.float64) @ h.astype(np.float64), np.eye(n), atol=1e-6)


@pytest.mark.parametrize("nrot", [64, 128, 256])
def test_rotate_is_chunked_h_times_x_and_self_inverse(nrot):
    rng = np.random.default_rng(nrot)
    x = rng.standard_normal((3, 5, 2 * 256)).astype(np.float32)
    r = codec.rotate(x, nrot)
    h = codec.hadamard_matrix(nrot).astype(np.float64)
    want = (x.reshape(-1, nrot).astype(np.float64) @ h.T).reshape(x.shape)  # each chunk c -> H @ c
    np.testing.assert_allclose(r, want, rtol=0, atol=2e-6 * np.abs(x).max())
    back = codec.unrotate(r, nrot)
    err = np.abs(back - x).max() / np.abs(x).max()
    assert err < 4 * np.finfo(np.float32).eps, err
    y = x.copy()
    assert codec.rotate(y, nrot, out=y) is y
    np.testing.assert_array_equal(y, r)


@pytest.mark.parametrize("nrot", [64, 128, 256])
def test_rotate_bit_identical_to_ggml_cpu_fwht(ggml, nrot):
    """llama_mul_mat_hadamard's graph (mul_mat + GGML_HINT_SRC0_IS_HADAMARD) on the CPU backend."""
    rng = np.random.default_rng(100 + nrot)
    x = (rng.standard_normal((12, 2 * 256)) * 10.0 ** rng.uniform(-3, 3, (12, 1))).astype(np.float32)
    want = ggml.mul_mat_hadamard(x, nrot, hint=True)
    np.testing.assert_array_equal(codec.rotate(x, nrot).view(np.uint32), want.view(np.uint32))
    plain = ggml.mul_mat_hadamard(x, nrot, hint=False)   # the matrix product (other backends): close, not equal
    np.testing.assert_allclose(plain, want, rtol=0, atol=2e-6 * np.abs(x).max())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
