"""Benchmark: one compaction (50% selection) through the state blob and in place on the cache's own memory, each
÷ a plain memory copy of the cache measured in the same run (issue 11's figure: the bridge's own work ≤ 1.2×).

The cache is 8B-shaped: 32 layers x 1024-wide K and V (8 KV heads x 128) x 4000 cells of f16 (500 MiB), on a
tiny GGUF with that KV geometry (d_model 64), filled by writing a random state (no 4000-token prefill).
Before every timed compaction the full cache is written back (untimed).  Rows:

- state path: ``KVBridge(ctx, inplace=False, reuse_buffers=True).compact(plan)``: get + parse + apply + set;
- in place, caller's state: ``compact(plan, st)`` when the caller already read the state to plan (the state is
  only the fallback restore source);
- in place, no state: ``compact(plan)`` (the engine planning on ``planning_state()``).  Either way the apply
  permutes the cells and keeps its own exact undo (for a selection: nothing copied).

The in-place rows are measured with 1 Numba thread and with ``--threads`` (default: all cores; the row kernels
split the KV heads over the threads); ``np.copyto`` is single-threaded, so the 1-thread rows are the like-for-
like figure.

    python benchmarks/speed/bench_inplace.py [--cells 4000] [--layers 32] [--repeat 3] [--flash-attn 0|1]
        [--threads N]
"""
from __future__ import annotations

import os
import tempfile
import time

import numba
import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench_bridge import copy_buffers, selection_plan, shape_args, shaped_cache  # noqa: E402
from kvmerge_local.bridge import KVBridge  # noqa: E402


def timed(setup, fn, repeat: int) -> tuple[float, float]:
    """(wall, cpu): minimum wall and process-CPU seconds of ``fn()`` over ``repeat`` runs (after a warm-up),
    ``setup()`` untimed before each.  On a shared machine CPU time is the steadier figure (with one Numba
    thread, ``NUMBA_NUM_THREADS=1``, it is also the work's own duration)."""
    wall, cpu = [], []
    for i in range(repeat + 1):
        setup()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if i:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main() -> None:
    ap = shape_args(__doc__)
    ap.add_argument("--flash-attn", type=int, default=1, help="1: V rows; 0: V transposed")
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                    help="Numba threads for the second set of in-place rows")
    a = ap.parse_args()
    N, L, H, d = a.cells, a.layers, a.kv_heads, a.head_dim
    with tempfile.TemporaryDirectory() as tmp:
        model, ctx, st = shaped_cache(a, tmp, bool(a.flash_attn))
        state_br = KVBridge(ctx, inplace=False, reuse_buffers=True)
        br = KVBridge(ctx, reuse_buffers=True)
        kv_bytes = st.nbytes
        src, dst = copy_buffers(kv_bytes)
        t_copy = timed(lambda: None, lambda: np.copyto(dst, src), a.repeat)
        plan = selection_plan(L, H, N, N // 2)
        refill = lambda: br.write(st)  # noqa: E731
        t_state = timed(refill, lambda: state_br.compact(plan), a.repeat)
        inplace_rows = []
        for n_threads in dict.fromkeys((1, a.threads)):
            numba.set_num_threads(n_threads)
            inplace_rows += [
                (f"in place, caller's state ({n_threads} thr)", timed(refill, lambda: br.compact(plan, st), a.repeat)),
                (f"in place, no state ({n_threads} thr)", timed(refill, lambda: br.compact(plan), a.repeat))]
        # same result both ways (bytes of the compacted cache)
        refill()
        state_br.compact(plan)
        ref = state_br.read().blob.copy()
        refill()
        br.compact(plan)
        same = np.array_equal(state_br.read().blob, ref)
        rows = [
            ("np.copyto of the cache (reference)", t_copy),
            ("state path (get+parse+apply+set)", t_state),
            *inplace_rows,
        ]
        print(f"cache: {L} layers x {H * d}-wide K and V x {N} cells, f16 = {kv_bytes / 2**20:.0f} MiB, "
              f"V {'rows' if a.flash_attn else 'transposed'}; plan: 50% selection; cores: {os.cpu_count()}")
        print(f"{'compaction':38s} {'wall s':>8s} {'x copy':>7s} {'cpu s':>8s} {'x copy':>7s}")
        for name, (w, c) in rows:
            print(f"{name:38s} {w:8.4f} {w / t_copy[0]:7.2f} {c:8.4f} {c / t_copy[1]:7.2f}")
        print(f"in-place result byte-identical to the state path's: {same}")
        ctx.close()
        model.close()


if __name__ == "__main__":
    main()
