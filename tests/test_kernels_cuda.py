"""numba.cuda twins (apply plan, adjacent cosine, Gaussian merge) against the CPU kernels.

The CUDA simulator (NUMBA_ENABLE_CUDASIM=1) must be set before numba is imported, so it runs in a
subprocess and never leaks into the other tests.  There the twins' own kernels run (their CPU fallback is
made to raise) and are compared with the CPU kernels.
"""
import os
import subprocess
import sys
import textwrap


CHECK = textwrap.dedent('''
    import numpy as np
    from numba import config
    assert config.ENABLE_CUDASIM
    from kvmerge_local.kernels import cuda as C
    from kvmerge_local.kernels.apply import apply_plan
    from kvmerge_local.kernels.similarity import adjacent_cosine
    from kvmerge_local.kernels.merge import csr_offsets, gaussian_runs_fill
    from kvmerge_local.kernels.strided import flat_view
    from kvmerge_local.methods import REGISTRY
    assert C.cuda_available()
    rng = np.random.default_rng(0)
    L, H, N, d, m = 1, 2, 12, 4, 5
    for dtype in (np.float16, np.float32):
        k = np.cumsum(rng.standard_normal((L, H, N, d)), 2).astype(dtype)
        k[0, 1, 3] = 0
        v = rng.standard_normal((L, H, d, N)).astype(dtype).transpose(0, 1, 3, 2)
        ev = rng.random((L, H, N)).astype(np.float32)
        for name in ("kvmerger+size", "cam+h2o", "snapkv"):
            p = REGISTRY[name].plan(k, v, None, ev, m)
            for which, x in (("k", k), ("v", v)):
                a = apply_plan(x, np.empty((L, H, m, d), dtype), p, which)
                b = C.apply_plan_cuda(x, np.empty((L, H, m, d), dtype), p, which)
                assert a.tobytes() == b.tobytes(), (name, which, dtype)
        assert np.allclose(adjacent_cosine(k), C.adjacent_cosine_cuda(k), atol=1e-6)
        meth = REGISTRY["kvmerger"]
        start, end = meth.runs(k.view(np.uint16) if dtype == np.float16 else k, ev, m)
        pos = np.broadcast_to(np.arange(N, dtype=np.int32), (L, H, N))
        for sigma, rms, size in ((0.0, True, False), (2.0, False, True)):
            g = C.gaussian_runs_cuda(k, ev, pos, start, end, sigma, rms, size)
            off = csr_offsets(end - start)
            nnz = int(off[-1, -1, -1])
            src, wk, wv = np.empty(nnz, np.int32), np.empty(nnz, np.float32), np.empty(nnz, np.float32)
            ps = np.empty((L, H, m), np.int32)
            gaussian_runs_fill(*flat_view(k), ev, pos, start, end, sigma, rms, size, off, src, wk, wv, ps)
            assert np.array_equal(g.src, src) and np.array_equal(g.pos, ps)
            assert np.allclose(g.wk, wk, rtol=1e-5) and np.allclose(g.wv, wv, rtol=1e-5)
    print("CUDASIM-OK")
''')


def test_cuda_twins_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "CUDASIM-OK" in r.stdout, r.stdout + r.stderr


EVERY_PLAN = textwrap.dedent('''
    import numpy as np
    from numba import config
    assert config.ENABLE_CUDASIM
    import kvmerge_local.kernels.apply as A
    from kvmerge_local.kernels import cuda as C
    from kvmerge_local.kernels.merge import csr_offsets, gaussian_runs_fill
    from kvmerge_local.kernels.strided import flat_view
    from kvmerge_local.methods import REGISTRY
    assert C.cuda_available()
    cpu_apply = A.apply_plan

    def no_cpu(*a, **k):
        raise AssertionError("the twin fell back to the CPU kernel")

    C._fallback = no_cpu  # every twin must run its own numba.cuda kernel
    A.apply_plan = no_cpu  # (apply_plan_cuda looks its CPU fallback up at call time)
    rng = np.random.default_rng(3)
    L, H, N, d, m = 4, 1, 120, 4, 60  # m beyond the protected cells: the mergers merge (kvmerger+skip: layer 2)
    merged = set()
    for dtype in (np.float16, np.float32):
        k = (np.cumsum(rng.standard_normal((L, H, N, d)), 2) * 40).astype(dtype)  # merges near the f16 limit
        v = rng.standard_normal((L, H, d, N)).astype(dtype).transpose(0, 1, 3, 2)
        ev = rng.random((L, H, N)).astype(np.float32)
        for name, meth in REGISTRY.items():
            p = meth.plan(k, v, None, ev, m)
            if p.src.shape[0] > L * H * m:
                merged.add(name)
            for which, x in (("k", k), ("v", v)):
                a = cpu_apply(x, np.empty((L, H, p.m, d), dtype), p, which)  # "full" keeps all N
                b = C.apply_plan_cuda(x, np.empty((L, H, p.m, d), dtype), p, which)
                assert a.tobytes() == b.tobytes(), (name, which, dtype)
        kk = k.view(np.uint16) if dtype == np.float16 else k
        pos = np.broadcast_to(np.arange(N, dtype=np.int32), (L, H, N))
        for name in ("kvmerger", "kvmerger+budget"):
            start, end = REGISTRY[name].runs(kk, ev, m)
            off = csr_offsets(end - start)
            nnz = int(off[-1, -1, -1])
            src, wk, wv = np.empty(nnz, np.int32), np.empty(nnz, np.float32), np.empty(nnz, np.float32)
            ps = np.empty((L, H, m), np.int32)
            gaussian_runs_fill(*flat_view(k), ev, pos, start, end, 0.0, True, True, off, src, wk, wv, ps)
            g = C.gaussian_runs_cuda(k, ev, pos, start, end, 0.0, True, True)
            assert np.array_equal(g.src, src) and np.array_equal(g.pos, ps) and np.array_equal(g.offsets, off)
            assert np.allclose(g.wk, wk, rtol=1e-5) and np.allclose(g.wv, wv, rtol=1e-5), name
    assert {"kvmerger", "kvmerger+budget", "kvmerger+skip", "kvmerger+size", "cam+h2o"} <= merged, merged
    print("EVERY-PLAN-OK", len(REGISTRY))
''')


def test_twins_match_cpu_kernels_on_every_registry_plan():
    """Replaces an in-process test that compared the CPU kernel with itself when there is no GPU: under the
    simulator the numba.cuda kernels run (the CPU fallback is made to raise) and are compared with the CPU
    kernels, which are other functions, on the plan of every registry entry, merging plans included."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", EVERY_PLAN], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "EVERY-PLAN-OK" in r.stdout, r.stdout + r.stderr
