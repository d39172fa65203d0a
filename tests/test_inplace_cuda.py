"""In-place compaction on CUDA cache tensors (kernels.inplace_cuda) under the CUDA simulator.

The simulator (NUMBA_ENABLE_CUDASIM=1) must be set before numba is imported, so every check runs in a subprocess
(as tests/test_kernels_cuda.py).  Each case builds per-layer cache tensors laid out like llama.cpp's (K rows
``uint8[kv_size, row_bytes]``; V rows, or transposed ``[n_embd, kv_size]`` elements), compacts them in place
with the numba.cuda kernels and compares slots ``0..m-1`` with two other code paths:

- the CPU apply kernel (kernels.apply) on the decoded cells, re-encoded with the codec (q8_0 with the REF
  rounding ggml's CUDA backend stores with), copies placed raw with the bridge's ``copy_sources``: bit-exact
  for every type;
- the state-blob path (``apply_plan_to_state`` on a KVState of the same bytes): bit-exact for f32/f16/bf16/q4_0
  and for every copy slot; q8_0 merges within one code (the state path rounds with this CPU's x86 variant).
  (The state path used to merge bf16 as f16 bits: ``test_state_path_bf16_merges_match_bf16_arithmetic``.)
"""
import os
import subprocess
import sys
import textwrap

import pytest

COMMON = textwrap.dedent('''
    import time
    from types import SimpleNamespace
    import numpy as np
    from numba import config, cuda
    assert config.ENABLE_CUDASIM
    from kvmerge_local import codec
    from kvmerge_local.codec import types as T
    from kvmerge_local.kernels import inplace_cuda as IC
    from kvmerge_local.kernels.apply import apply_plan
    from kvmerge_local.methods import get_method
    from kvmerge_local.plan import Plan
    from kvmerge_local.bridge.kv import apply_plan_to_state, copy_sources
    from kvmerge_local.bridge.state import KVGeometry, float_views, new_state

    TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}
    REF = codec.Q8_VARIANT_REF
    L, H, N, d, m, KV = 2, 2, 24, 32, 10, 28
    rng = np.random.default_rng(0)

    def encode(x, t, variant=REF):
        """float32[n, e] -> raw uint8[n, row_bytes] of ggml type t."""
        if t == 0:
            return np.ascontiguousarray(x, np.float32).view(np.uint8)
        if t == 1:
            return x.astype(np.float16).view(np.uint8)
        if t == 30:
            return codec.f32_to_bf16_bits_array(x).view(np.uint8)
        return codec.quantize_rows(np.ascontiguousarray(x, np.float32), t, q8_variant=variant)

    def decode(raw, t):
        return codec.dequantize_rows(np.ascontiguousarray(raw), t)

    def rows_layers(x, t):
        """x float32[L, H, N, d] -> per layer uint8[KV, row_bytes] (rows N.. are garbage)."""
        out = []
        for l in range(L):
            raw = encode(x[l].transpose(1, 0, 2).reshape(N, H * d), t)
            a = rng.integers(0, 256, (KV, raw.shape[1]), dtype=np.uint8)
            if t in (2, 8):  # garbage rows must still be decodable blocks (never read, but keep them finite)
                a[N:] = encode(rng.standard_normal((KV - N, H * d)).astype(np.float32), t)
            a[:N] = raw
            out.append(a)
        return out

    def trans_layers(x, t):
        """x float32[L, H, N, d] -> per layer [H*d, KV] elements (float32 / float16 / bf16 bits)."""
        out = []
        for l in range(L):
            raw = encode(x[l].transpose(0, 2, 1).reshape(H * d * N, 1), t).view(
                {0: np.float32, 1: np.float16, 30: np.uint16}[t]).reshape(H * d, N)
            a = np.zeros((H * d, KV), raw.dtype)
            a[:, :N] = raw
            out.append(a)
        return out

    def heads_raw(layers, trans, n):
        """Slots 0..n-1 as raw bytes [L, H, n, head_bytes]."""
        if trans:
            return np.stack([a[:, :n].reshape(H, d, n).transpose(0, 2, 1).copy().view(np.uint8) for a in layers])
        return np.stack([a[:n].reshape(n, H, -1).transpose(1, 0, 2) for a in layers])

    def expected(raw4, t, plan, which):
        """CPU reference: raw4 uint8[L, H, N, hb] -> uint8[L, H, m, hb] (apply kernel + codec, copies raw)."""
        hb = raw4.shape[3]
        x = decode(raw4.reshape(-1, hb), t).reshape(L, H, N, d)
        if t == 1:
            y = apply_plan(raw4.view(np.float16), np.empty((L, H, plan.m, d), np.float16), plan, which).view(np.uint8)
        else:
            y = apply_plan(x, np.empty((L, H, plan.m, d), np.float32), plan, which)
            y = encode(y.reshape(-1, d), t).reshape(L, H, plan.m, hb)
        cs = copy_sources(plan, which)
        li, hi, ji = np.nonzero(cs >= 0)
        y[li, hi, ji] = raw4[li, hi, cs[li, hi, ji]]
        return y

    def state_of(kraw4, vraw4, kt, vt, v_trans):
        """A KVState blob holding the same cells (built with bridge.state.new_state)."""
        g = KVGeometry(L, H, d)
        like = SimpleNamespace(geom=g, seq_id=0, k_type=kt, v_type=vt, v_trans=v_trans,
                               k_row_bytes=T.row_bytes(kt, H * d), v_row_bytes=T.row_bytes(vt, H * d))
        st = new_state(like, N, np.arange(N, dtype=np.int32))
        st.k4[...] = kraw4.view(st.k4.dtype).reshape(st.k4.shape)
        st.v4[...] = vraw4.view(st.v4.dtype).reshape(st.v4.shape)
        return st

    def state_raw(a4):
        return np.ascontiguousarray(a4).view(np.uint8) if a4.dtype != np.uint8 else np.ascontiguousarray(a4)

    def shuffled_plan(seed):
        """Copies whose sources lie before their slot (src < j) and merges whose sources are overwritten."""
        r = np.random.default_rng(seed)
        off = np.zeros((L, H, m + 1), np.int64); src, wk, wv = [], [], []
        for l in range(L):
            for h in range(H):
                off[l, h, 0] = len(src)
                cells = r.permutation(N)
                for j in range(m):
                    if j % 3 == 2:
                        mem = r.choice(N, 3, replace=False); g = r.uniform(0.2, 1, 3).astype(np.float32)
                        src += mem.tolist(); wk += (g / g.sum()).tolist(); wv += (g * 0.7).tolist()
                    else:
                        src.append(int(cells[j])); wk.append(1.0); wv.append(1.0)
                    off[l, h, j + 1] = len(src)
        pos = np.broadcast_to(np.arange(m, dtype=np.int32), (L, H, m)).copy()
        return Plan(N, off, np.array(src, np.int32), np.array(wk, np.float32), np.array(wv, np.float32), pos)

    def make_plans(k, v):
        ev = rng.random((L, H, N)).astype(np.float32)
        plans = {"h2o": get_method("h2o").plan(k, v, None, ev, m),
                 "kvmerger+budget": get_method("kvmerger+budget", n_sink=2, n_recent=3).plan(k, v, None, ev, m),
                 "kvmerger": get_method("kvmerger", n_sink=2, n_recent=3).plan(k, v, None, ev, m),
                 "cam+h2o": get_method("cam+h2o").plan(k, v, None, ev, m),
                 "shuffled": shuffled_plan(1)}
        assert plans["kvmerger+budget"].src.shape[0] > L * H * m and np.any(plans["cam+h2o"].wk == 0)
        return plans
''')


APPLY = COMMON + textwrap.dedent('''
    t0 = time.time()
    k = (np.cumsum(rng.standard_normal((L, H, N, d)), 2) * 0.3).astype(np.float32)
    v = rng.standard_normal((L, H, N, d)).astype(np.float32)
    plans = make_plans(k, v)
    layouts = [("f16", "f16", False), ("f16", "f16", True), ("f32", "f32", True), ("bf16", "bf16", False),
               ("bf16", "bf16", True), ("q8_0", "q8_0", False), ("q4_0", "q4_0", False), ("q8_0", "f16", True),
               ("f32", "q4_0", False)]
    n_exact = n_state = 0
    q8_codes = 0
    for kn, vn, vt in layouts:
        kt, vtp = TYPE[kn], TYPE[vn]
        kl = rows_layers(k, kt)
        kraw = heads_raw(kl, False, N)
        for name, p in plans.items():
            kl = rows_layers(k, kt)
            vl = trans_layers(v, vtp) if vt else rows_layers(v, vtp)
            kraw, vraw = heads_raw(kl, False, N), heads_raw(vl, vt, N)
            dk = [cuda.to_device(a) for a in kl]  # device arrays: compacted in place
            IC.apply_inplace_cuda(dk, vl, p, v_trans=vt, k_type=kt, v_type=vtp)  # host V: copied back
            gk = heads_raw([a.copy_to_host() for a in dk], False, p.m)
            gv = heads_raw(vl, vt, p.m)
            case = (kn, vn, vt, name)
            for which, got, raw, t in (("k", gk, kraw, kt), ("v", gv, vraw, vtp)):
                exp = expected(raw, t, p, which)
                assert np.array_equal(got, exp), (case, which, np.argwhere(np.any(got != exp, axis=3))[:5])
                n_exact += 1
            # the state-blob path on the same bytes
            new = apply_plan_to_state(state_of(kraw, vraw, kt, vtp, vt), p)
            for which, got, a4, t in (("k", gk, new.k4, kt), ("v", gv, new.v4, vtp)):
                ref = state_raw(a4)
                if t == 8:
                    cs = copy_sources(p, which) >= 0
                    assert np.array_equal(got[cs], ref[cs]), case
                    blk = got.reshape(L, H, p.m, -1, 34); rb = ref.reshape(blk.shape)
                    assert np.array_equal(blk[..., :2], rb[..., :2]), case  # scales equal
                    dq = np.abs(blk[..., 2:].view(np.int8).astype(int) - rb[..., 2:].view(np.int8).astype(int))
                    assert dq.max() <= 1, case
                    q8_codes += int(np.count_nonzero(dq))
                else:
                    assert np.array_equal(got, ref), (case, which)
                n_state += 1
    # a deliberately wrong plan (two copy sources swapped) must not match
    p = plans["h2o"]
    bad = Plan(p.n_in, p.offsets, p.src.copy(), p.wk, p.wv, p.pos)
    bad.src[[0, 1]] = bad.src[[1, 0]]
    kl = rows_layers(k, 1)
    kraw = heads_raw(kl, False, N)
    IC.apply_inplace_cuda(kl, rows_layers(v, 1), bad, v_trans=False, k_type=1, v_type=1)
    assert not np.array_equal(heads_raw(kl, False, m), expected(kraw, 1, p, "k"))
    print("APPLY-OK", n_exact, n_state, q8_codes, round(time.time() - t0, 1))
''')


POINTER = COMMON + textwrap.dedent('''
    base = cuda.to_device(np.arange(64, dtype=np.float32).reshape(8, 8))
    ptr = IC.device_pointer(base)
    w = IC.device_array_from_pointer(ptr, (8, 8), np.float32)
    w[2, 3] = -1.0
    assert base.copy_to_host()[2, 3] == -1.0
    # a strided window: every other row, columns 4..7
    win = IC.device_array_from_pointer(ptr + 16, (4, 4), np.float32, strides=(64, 4))
    win[1, 0] = 99.0
    assert base.copy_to_host()[2, 4] == 99.0
    # compaction through wrapped pointers changes the original device arrays
    k = (np.cumsum(rng.standard_normal((L, H, N, d)), 2) * 0.3).astype(np.float32)
    v = rng.standard_normal((L, H, N, d)).astype(np.float32)
    p = make_plans(k, v)["kvmerger+budget"]
    kl, vl = rows_layers(k, 1), trans_layers(v, 1)
    kraw, vraw = heads_raw(kl, False, N), heads_raw(vl, True, N)
    dk, dv = [cuda.to_device(a) for a in kl], [cuda.to_device(a) for a in vl]
    wk = [IC.device_array_from_pointer(IC.device_pointer(a), a.shape, a.dtype) for a in dk]
    wv = [IC.device_array_from_pointer(IC.device_pointer(a), a.shape, a.dtype, strides=a.strides) for a in dv]
    with IC.synchronized():
        IC.apply_inplace_cuda(wk, wv, p, v_trans=True, k_type=1, v_type=1)
    assert np.array_equal(heads_raw([a.copy_to_host() for a in dk], False, m), expected(kraw, 1, p, "k"))
    assert np.array_equal(heads_raw([a.copy_to_host() for a in dv], True, m), expected(vraw, 1, p, "v"))
    # planning input: only the keys, as bridge.state.float_views gives them from a state blob
    for name in ("f16", "f32", "bf16", "q8_0", "q4_0"):
        t = TYPE[name]
        dk = [cuda.to_device(a) for a in rows_layers(k, t)]
        kraw = heads_raw([a.copy_to_host() for a in dk], False, N)
        got = IC.read_keys_cuda(dk, N, H, k_type=t)
        ref, _ = float_views(state_of(kraw, kraw, t, t, False))
        assert got.dtype == ref.dtype and np.array_equal(got, ref), name
    print("POINTER-OK")
''')


ROPE = COMMON + textwrap.dedent('''
    from kvmerge_local.bridge.rope import RopeParams, rerotate_state_keys
    from kvmerge_local.kernels.rope import rotate_keys
    d = 64  # the quantized types' Hadamard rotation needs head_dim % 64 == 0
    k = (rng.standard_normal((L, H, N, d)) * 2).astype(np.float32)
    delta = rng.integers(-40, 1, (L, H, N))
    delta[0, 0, :3] = 0
    n_rot = 48
    for neox in (False, True):
        rope = RopeParams(head_dim=d, n_rot=n_rot, freq_base=10000.0, neox=neox)
        lo, hi = int(delta.min()), int(delta.max())
        cos_t, sin_t = rope.angles(np.arange(lo, hi + 1))
        idx = delta - lo
        idx[delta == 0] = -1
        for name in ("f16", "f32", "bf16", "q8_0", "q4_0"):
            t = TYPE[name]
            kl = rows_layers(k, t)
            raw = heads_raw(kl, False, N)
            nrot = codec.cache_rot_size(t, d, "k") if t in (2, 8) else 0
            n = IC.rerotate_inplace_cuda(kl, idx, cos_t, sin_t, neox=neox, k_type=t, nrot_hadamard=nrot)
            assert n == np.count_nonzero(delta)
            got = heads_raw(kl, False, N)
            if t in (0, 1):  # the CPU kernel on the same bytes
                ref = raw.copy()
                rotate_keys(ref.view(np.float16 if t == 1 else np.float32), idx, cos_t, sin_t, neox)
            else:  # the bridge's re-rotation (decode, un-Hadamard, RoPE, Hadamard, encode), q8_0 in REF rounding
                ref = raw.copy()
                x = decode(ref.reshape(-1, ref.shape[3]), t)
                if nrot:
                    x = codec.unrotate(x, nrot)
                x4 = x.reshape(L, H, N, d)
                rotate_keys(x4, idx, cos_t, sin_t, neox)
                x = x4.reshape(-1, d)
                if nrot:
                    x = codec.rotate(np.ascontiguousarray(x), nrot)
                ref = encode(x, t).reshape(raw.shape)
                if t != 8:  # bf16/q4_0: also the bridge's own state path, same bits
                    st = state_of(raw, raw, t, t, False)
                    rerotate_state_keys(st, delta, rope)
                    assert np.array_equal(got, state_raw(st.k4)), name
            assert np.array_equal(got, ref), (name, neox)
            assert np.array_equal(got[delta == 0], raw[delta == 0]) or t in (2, 8), name
    print("ROPE-OK")
''')


BF16_STATE = COMMON + textwrap.dedent('''
    k = (np.cumsum(rng.standard_normal((L, H, N, d)), 2) * 0.3).astype(np.float32)
    v = rng.standard_normal((L, H, N, d)).astype(np.float32)
    p = make_plans(k, v)["kvmerger+budget"]
    kl, vl = rows_layers(k, 30), rows_layers(v, 30)
    kraw, vraw = heads_raw(kl, False, N), heads_raw(vl, False, N)
    new = apply_plan_to_state(state_of(kraw, vraw, 30, 30, False), p)
    ref = state_raw(new.k4)
    exp = expected(kraw, 30, p, "k")
    x = codec.bf16_bits_to_f32_array(ref.view(np.uint16))
    y = codec.bf16_bits_to_f32_array(exp.view(np.uint16))
    print("BF16", int(np.count_nonzero(ref != exp)), float(np.abs(x - y).max()))
    assert np.array_equal(ref, exp)
    print("BF16-OK")
''')


PTX = textwrap.dedent('''
    # Compile every kernel for a real GPU (sm_90 PTX through libNVVM; no device needed): types and lowering the
    # simulator never checks (it runs the kernels as Python), e.g. min() on int32 does not type on the CUDA
    # target.  Also: no FMA contraction anywhere (the CPU kernels do not fuse), f16 stores round to nearest even.
    import re
    from types import SimpleNamespace
    from numba import config
    assert not config.ENABLE_CUDASIM
    import numba.cuda.dispatcher as D
    D.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))  # device functions: no driver
    from numba import cuda, types as T
    from kvmerge_local.kernels import cuda_rows as K
    A2 = lambda dt: T.Array(dt, 2, "A")
    I1 = T.Array(T.int32, 1, "A")
    b, i64, f32 = T.boolean, T.int64, T.float32
    sigs = {
        "swap_in_order": [(A2(T.uint16), b, i64, A2(T.int32), T.Array(T.int8, 1, "A")),
                          (A2(T.uint32), b, i64, A2(T.int32), T.Array(T.int8, 1, "A"))],
        "unswap_in_order": [(A2(T.uint16), b, i64, A2(T.int32), T.Array(T.int8, 1, "A"))],
        "mark": [(T.Array(i64, 1, "A"), i64)],
        "restore_if": [(A2(T.uint16), b, i64, I1, I1, A2(T.uint16), T.Array(i64, 1, "A"), i64)],
        "stage_raw": [(A2(T.uint16), b, i64, I1, I1, A2(T.uint16), b)],
        "gather_float": [(A2(T.float16), b, i64, I1, I1, A2(f32)), (A2(f32), b, i64, I1, I1, A2(f32))],
        "gather_bf16": [(A2(T.uint16), b, i64, I1, I1, A2(T.uint32))],
        "gather_q": [(A2(T.uint8), A2(T.float16), i64, b, I1, I1, A2(f32))],
        "merge_rows": [(A2(f32), I1, i64, T.Array(i64, 3, "A"), i64, T.Array(f32, 1, "A"), I1, I1, A2(f32))],
        "write_float": [(A2(T.float16), b, i64, I1, I1, A2(f32), f32), (A2(f32), b, i64, I1, I1, A2(f32), f32)],
        "write_bf16": [(A2(T.uint16), b, i64, I1, I1, A2(T.uint32))],
        "write_q": [(A2(T.uint8), A2(T.float16), i64, b, I1, I1, A2(f32))],
        "rope_rows": [(A2(f32), I1, A2(f32), A2(f32), b)],
        "fwht_rows": [(A2(f32), i64, f32)],
    }
    n = 0
    for name, ss in sigs.items():
        for sig in ss:
            ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, T.void(*sig), cc=(9, 0))
            assert not re.search(r"\\bfma\\.", ptx), name
            assert not re.search(r"cvt\\.(rz|rm|rp)[.a-z0-9]*f16", ptx), name
            n += 1
    print("PTX-OK", n)
''')


def _run(script: str, tag: str, timeout: int = 900) -> str:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and tag in r.stdout, r.stdout + r.stderr[-4000:]
    return r.stdout


def test_kernels_compile_for_a_gpu():
    """sm_90 PTX of every kernel (libNVVM, no GPU): skipped when this numba finds no libNVVM."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", PTX], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode and ("NVVM" in r.stderr and "cannot be found" in r.stderr or "libNVVM" in r.stderr):
        pytest.skip("no libNVVM: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0 and "PTX-OK" in r.stdout, r.stdout + r.stderr[-4000:]


def test_apply_inplace_matches_cpu_and_state_paths():
    """f16/f32/bf16/q8_0/q4_0, both V layouts, 2 KV heads, selection, KVMerger (threshold and budget), CaM and a
    plan with backward copies; a plan with two swapped sources does not match."""
    out = _run(APPLY, "APPLY-OK")
    n_exact, n_state = (int(x) for x in out.split("APPLY-OK")[1].split()[:2])
    assert n_exact == 9 * 5 * 2 and n_state > 0


def test_device_pointer_wrapper_writes_through():
    """A simulator array's pointer wrapped back (plain and strided) sees writes both ways; compaction through
    wrapped pointers changes the original arrays; read_keys_cuda gives the planner float_views' keys."""
    _run(POINTER, "POINTER-OK")


def test_rerotate_inplace_matches_cpu():
    """f16/f32 against kernels.rope.rotate_keys, bf16/q4_0 against the bridge's rerotate_state_keys, q8_0 against
    the same steps with the REF rounding; NORM and NEOX pairs, n_rot < head_dim, some deltas 0."""
    _run(ROPE, "ROPE-OK")


def test_state_path_bf16_merges_match_bf16_arithmetic():
    """Regression: the state path merged bf16 caches as if they were f16 bits (fixed in bridge.kv._apply_bf16)."""
    _run(BF16_STATE, "BF16-OK")
