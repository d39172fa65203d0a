"""Throughput of kvmerge_local.codec on an 8B-shaped cache vs a plain memory copy, measured in the same run.

Cache: 32 layers x [4000 rows, 1024 elements] (one of K or V). For each type (f16, q8_0) it times, over all
layers: dequantize_rows (raw -> preallocated float32), quantize_rows (float32 -> preallocated raw), a gather of
25% of the rows, and np.copyto of the raw bytes and of the float32 bytes. GB/s counts raw cache bytes and
float32 bytes separately; best of --repeat runs.

Usage: python bench/bench_codec.py [--layers 32 --rows 4000 --width 1024 --repeat 3]
"""
from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402

from _timing import best  # noqa: E402
from kvmerge_local import codec  # noqa: E402

log = logging.getLogger(__name__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    L, R, W = args.layers, args.rows, args.width
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((R, W), dtype=np.float32) for _ in range(L)]
    y = [np.empty((R, W), np.float32) for _ in range(L)]
    y2 = [np.empty((R, W), np.float32) for _ in range(L)]
    sel = np.sort(rng.choice(R, R // 4, replace=False))
    yg = np.empty((len(sel), W), np.float32)
    f32_gb = L * R * W * 4 / 1e9
    print(f"cache: {L} layers x {R} rows x {W} elems; numba threads={numba.get_num_threads()}, "
          f"cpu count={os.cpu_count()}; best of {args.repeat}")

    t = best(lambda: [np.copyto(y2[i], y[i]) for i in range(L)], args.repeat)
    print(f"  memcpy float32 ({f32_gb:.3f} GB)           {t * 1e3:8.1f} ms  {f32_gb / t:6.2f} GB/s")

    for type_id in (codec.GGML_TYPE_F16, codec.GGML_TYPE_Q8_0):
        name = codec.type_name(type_id)
        raw = [codec.quantize_rows(x[i], type_id) for i in range(L)]
        raw2 = [np.empty_like(r) for r in raw]
        codec.dequantize_rows_at(raw[0], type_id, sel, yg)   # compile / warm up
        codec.dequantize_rows(raw[0], type_id, y[0])
        raw_gb = sum(r.nbytes for r in raw) / 1e9
        t_copy = best(lambda: [np.copyto(raw2[i], raw[i]) for i in range(L)], args.repeat)
        t_deq = best(lambda: [codec.dequantize_rows(raw[i], type_id, y[i]) for i in range(L)], args.repeat)
        t_q = best(lambda: [codec.quantize_rows(x[i], type_id, raw2[i]) for i in range(L)], args.repeat)
        t_g = best(lambda: [codec.dequantize_rows_at(raw[i], type_id, sel, yg) for i in range(L)], args.repeat)
        print(f"{name}: raw cache {raw_gb:.3f} GB")
        print(f"  memcpy raw                         {t_copy * 1e3:8.1f} ms  {raw_gb / t_copy:6.2f} GB/s raw")
        for label, t in (("dequantize_rows (raw -> f32)", t_deq), ("quantize_rows   (f32 -> raw)", t_q)):
            print(f"  {label}       {t * 1e3:8.1f} ms  {raw_gb / t:6.2f} GB/s raw, {f32_gb / t:6.2f} GB/s f32,"
                  f" {t / t_copy:5.2f}x memcpy-raw time")
        print(f"  dequantize_rows_at (25% rows)      {t_g * 1e3:8.1f} ms  {raw_gb / 4 / t_g:6.2f} GB/s raw, "
              f"{f32_gb / 4 / t_g:6.2f} GB/s f32")


if __name__ == "__main__":
    main()
