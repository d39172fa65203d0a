"""Benchmark: compaction throughput of every registered method vs a plain memory copy, in one run.

For each cache shape (default: Llama-3-8B-like 32 layers x 8 KV heads x 128 and Llama-2-7B-like
32 x 32 x 128, 4096 cells, f16) and a 50% budget, times ``method.plan`` and ``apply_plan`` on K and V and
reports GB/s over the input K+V bytes, next to ``np.copyto`` of the same bytes measured in the same run.
Columns: wall-clock ms (best of --repeat), GB/s over the input bytes, ratios to memcpy by wall time, and
"cpu ratio" = memcpy CPU time / method CPU time (with --threads 1 the steadiest figure on a shared machine).
Keys are an AR(1) walk along the cells (adjacent cosine about 0.8, as the KVMerger paper observes), values
i.i.d. normal, evidence a random positive vector.

    python bench/bench_methods.py                     # both shapes, all methods
    python bench/bench_methods.py --layers 8 --shapes 8b --methods kvmerger,snapkv
"""
from __future__ import annotations

import argparse
import logging

import numpy as np

from _timing import best_of
from kvmerge_local.kernels.apply import apply_plan
from kvmerge_local.methods import REGISTRY, resolve_budget

log = logging.getLogger(__name__)

SHAPES = {"8b": (32, 8, 128), "7b": (32, 32, 128)}


def make_cache(L, H, N, d, v_layout, seed=0):
    """(keys f16 [L,H,N,d], values f16 [L,H,N,d] possibly a transposed view, evidence f32 [L,H,N])."""
    rng = np.random.default_rng(seed)
    keys = np.empty((L, H, N, d), np.float16)
    x = rng.standard_normal((L, H, d), dtype=np.float32)
    for i in range(N):
        x = 0.8 * x + 0.6 * rng.standard_normal((L, H, d), dtype=np.float32)
        keys[:, :, i] = x
    if v_layout == "transposed":
        values = rng.standard_normal((L, H, d, N), dtype=np.float32).astype(np.float16).transpose(0, 1, 3, 2)
    else:
        values = rng.standard_normal((L, H, N, d), dtype=np.float32).astype(np.float16)
    evidence = rng.gamma(0.5, 1.0, (L, H, N)).astype(np.float32)
    return keys, values, evidence


def bench_shape(name, L, H, d, N, budget, methods, repeat, v_layout):
    keys, values, evidence = make_cache(L, H, N, d, v_layout)
    nbytes = keys.nbytes + values.nbytes
    m = resolve_budget(budget, N)
    # the plain copy moves the same bytes as stored (a transposed V is copied in its own layout)
    v_raw = values.transpose(0, 1, 3, 2) if v_layout == "transposed" else values
    kc, vc = np.zeros_like(keys), np.zeros_like(v_raw)

    def memcpy():
        np.copyto(kc, keys)
        np.copyto(vc, v_raw)

    t_copy, c_copy = best_of(memcpy, repeat)
    gbs_copy = nbytes / t_copy / 1e9
    print(f"\n== {name}: {L} layers x {H} KV heads x {d} dims, {N} cells f16 (V {v_layout}), budget {budget} -> {m} cells,"
          f" K+V {nbytes / 1e9:.2f} GB")
    print(f"memcpy (np.copyto K+V): {t_copy * 1e3:8.1f} ms  {gbs_copy:6.2f} GB/s  (cpu {c_copy * 1e3:.1f} ms)")
    print(f"{'method':20s} {'plan ms':>9s} {'apply ms':>9s} {'total ms':>9s} {'GB/s':>7s} {'total/memcpy':>13s}"
          f" {'apply/memcpy':>13s} {'cpu ratio':>10s}")
    outs = {}  # output buffers by cell count, allocated (and touched) once outside the timings

    def buffers(n):
        """(K out, V out) with n cells; V out in the input's layout (llama.cpp writes V back transposed)."""
        if n not in outs:
            vo = np.zeros((L, H, d, n), np.float16).transpose(0, 1, 3, 2) if v_layout == "transposed" else \
                np.zeros((L, H, n, d), np.float16)
            outs[n] = (np.zeros((L, H, n, d), np.float16), vo)
        return outs[n]

    rows = []
    for name_m in methods:
        meth = REGISTRY[name_m]
        holder = {}

        def plan():
            holder["p"] = meth.plan(keys, values, None, evidence, m)

        def apply():
            p = holder["p"]
            ko, vo = buffers(p.m)
            apply_plan(keys, ko, p, "k")
            apply_plan(values, vo, p, "v")

        t_plan, c_plan = best_of(plan, repeat)
        buffers(holder["p"].m)
        t_apply, c_apply = best_of(apply, repeat)
        tot = t_plan + t_apply
        print(f"{name_m:20s} {t_plan * 1e3:9.1f} {t_apply * 1e3:9.1f} {tot * 1e3:9.1f} {nbytes / tot / 1e9:7.2f}"
              f" {t_copy / tot:13.2f} {t_copy / t_apply:13.2f} {c_copy / (c_plan + c_apply):10.2f}", flush=True)
        rows.append((name_m, t_plan, t_apply))
        holder.clear()
    outs.clear()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8b,7b", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (smaller runs)")
    ap.add_argument("--cells", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default=",".join(k for k in REGISTRY if k != "cam"))
    ap.add_argument("--v-layout", choices=("rows", "transposed"), default="rows")
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    args = ap.parse_args(argv)
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, numpy {np.__version__}")
    for s in args.shapes.split(","):
        L, H, d = SHAPES[s]
        bench_shape(s, args.layers or L, H, d, args.cells, args.budget, args.methods.split(","), args.repeat, args.v_layout)


if __name__ == "__main__":
    main()
