"""numba.cuda twins (apply plan, adjacent cosine, Gaussian merge) against the CPU kernels.

The CUDA simulator (NUMBA_ENABLE_CUDASIM=1) must be set before numba is imported, so it runs in a
subprocess and never leaks into the other tests.  In-process, the twins fall back to the CPU kernels
when there is no GPU (or run on it when there is one) and must give the same results either way.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np

from kvmerge_local.kernels import cuda as C
from kvmerge_local.kernels.apply import apply_plan
from kvmerge_local.methods import REGISTRY

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


def test_twins_in_process_match_cpu():
    rng = np.random.default_rng(1)
    k = np.cumsum(rng.standard_normal((2, 2, 30, 8)), 2).astype(np.float16)
    ev = rng.random((2, 2, 30)).astype(np.float32)
    p = REGISTRY["kvmerger"].plan(k, k, None, ev, 10)
    a = apply_plan(k, np.empty((2, 2, 10, 8), np.float16), p, "v")
    b = C.apply_plan_cuda(k, np.empty((2, 2, 10, 8), np.float16), p, "v")
    assert a.tobytes() == b.tobytes()
    assert isinstance(C.cuda_available(), bool)
