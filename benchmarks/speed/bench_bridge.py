"""Benchmark: KV bridge read + write of an 8B-shaped cache against plain memory copies, in one run.

An 8B-shaped cache is 32 layers x 1024-wide K and V (8 KV heads x 128) x 4000 cells of f16 (500 MiB).  The
model behind it is a tiny GGUF with that KV geometry (d_model 64, so it builds in seconds); the cache is
filled by writing a random state through ``llama_state_seq_set_data``, so no 4000-token prefill is needed.

Prints, per step, seconds, GB/s over the cache bytes, and the ratio to ``np.copyto`` of the same bytes:

    python bench/bench_bridge.py [--cells 4000] [--layers 32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _timing import best  # noqa: E402
from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel, apply_plan_to_state, new_state  # noqa: E402
from kvmerge_local.bridge import _lib  # noqa: E402
from kvmerge_local.bridge.state import parse_state  # noqa: E402
from kvmerge_local.plan import Plan  # noqa: E402
from kvmerge_local.tiny.model import make_tiny_llama  # noqa: E402


def selection_plan(L: int, H: int, N: int, m: int, seed: int = 0) -> Plan:
    """Per (layer, head) a random sorted subset of m cells (newest kept): every slot a raw copy."""
    rng = np.random.default_rng(seed)
    src = np.empty((L, H, m), dtype=np.int32)
    for l in range(L):
        for h in range(H):
            src[l, h, :-1] = np.sort(rng.choice(N - 1, m - 1, replace=False))
            src[l, h, -1] = N - 1
    first = np.arange(L * H * m, dtype=np.int64).reshape(L, H, m)
    offsets = np.concatenate([first, first[..., -1:] + 1], axis=2)
    nnz = L * H * m
    return Plan(n_in=N, offsets=offsets, src=src.reshape(-1), wk=np.ones(nnz, np.float32),
                wv=np.ones(nnz, np.float32), pos=src.copy())


def shape_args(doc: str) -> argparse.ArgumentParser:
    """The command line of the cache-shape benchmarks (this one and bench_inplace.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    return ap


def shaped_cache(a: argparse.Namespace, tmp: str, flash_attn: bool = True):
    """(model, ctx, st): a context whose cache holds ``st``, a random f16 state of ``a.cells`` cells."""
    N, L, H, d = a.cells, a.layers, a.kv_heads, a.head_dim
    path = make_tiny_llama(Path(tmp) / "shape.gguf", n_layer=L, n_head=H, n_kv_head=H, head_dim=d, d_model=64,
                           n_ff=64, vocab="llama2-small", n_vocab=512)
    model = LlamaModel(path)
    n_ctx = (N + 255) // 256 * 256
    ctx = LlamaContext(model, n_ctx=n_ctx, n_threads=os.cpu_count() or 2, flash_attn=flash_attn)
    br = KVBridge(ctx, inplace=False)
    # a template state: 1 real cell, then a random N-cell state in the same layout
    ctx.decode([5], logits="none")
    proto = br.read()
    st = new_state(proto, N, np.arange(N, dtype=np.int32))
    rng = np.random.default_rng(0)
    st.k4[...] = rng.standard_normal(st.k4.shape, dtype=np.float32).astype(np.float16)
    st.v4[...] = rng.standard_normal(st.v4.shape, dtype=np.float32).astype(np.float16)
    br.write(st)
    return model, ctx, st


def copy_buffers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two touched byte buffers of ``n`` bytes: the plain memory copy every figure is divided by."""
    src = np.empty(n, np.uint8)
    src[:] = 1
    return src, np.empty_like(src)


def main() -> None:
    a = shape_args(__doc__).parse_args()
    N, L, H, d = a.cells, a.layers, a.kv_heads, a.head_dim
    with tempfile.TemporaryDirectory() as tmp:
        model, ctx, st = shaped_cache(a, tmp)
        br = KVBridge(ctx, inplace=False)
        kv_bytes = st.nbytes
        src, dst = copy_buffers(kv_bytes)

        t_copy = best(lambda: np.copyto(dst, src), a.repeat)
        buf = np.empty(st.blob.nbytes + 4096, np.uint8)
        t_get = best(lambda: _lib.state_seq_get(ctx.ptr, 0, buf), a.repeat)
        blob = _lib.state_seq_get(ctx.ptr, 0, buf)
        t_parse = best(lambda: parse_state(blob, model.geom), a.repeat)
        t_set = best(lambda: br.write(st), a.repeat)
        plan = selection_plan(L, H, N, N // 2)
        out = np.empty(st.blob.nbytes, np.uint8)  # preallocated, as KVBridge(reuse_buffers=True) does
        t_apply_sel = best(lambda: apply_plan_to_state(st, plan, out), a.repeat)
        half = apply_plan_to_state(st, plan, out)
        t_set_half = best(lambda: br.write(half), a.repeat)

        rows = [
            ("np.copyto (reference)", t_copy, kv_bytes),
            ("llama_state_seq_get_data", t_get, kv_bytes),
            ("parse (zero-copy views)", t_parse, kv_bytes),
            ("llama_state_seq_set_data", t_set, kv_bytes),
            ("apply 50% selection plan", t_apply_sel, kv_bytes // 2),
            ("set_data of the 50% cache", t_set_half, kv_bytes // 2),
        ]
        print(f"cache: {L} layers x {H * d}-wide K and V x {N} cells, f16 = {kv_bytes / 2**20:.0f} MiB")
        print(f"{'step':28s} {'seconds':>9s} {'GB/s':>8s} {'x copyto':>9s}")
        for name, t, nb in rows:
            print(f"{name:28s} {t:9.4f} {nb / t / 1e9:8.2f} {t / t_copy:9.2f}")
        own = t_parse + t_apply_sel
        print(f"bridge's own work for read + 50% compaction (parse + apply): {own:.4f} s = "
              f"{own / (2 * t_copy):.2f} x two memory copies of the cache (target <= 2)")
        print(f"whole round trip (get + parse + apply + set 50%): {t_get + t_parse + t_apply_sel + t_set_half:.4f} s")
        ctx.close()
        model.close()


if __name__ == "__main__":
    main()
