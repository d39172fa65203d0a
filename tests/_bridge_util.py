"""Shared helpers for the bridge tests: tiny models, contexts with a prompt, and hand-made plans."""
from __future__ import annotations

import numpy as np

from kvmerge_local.plan import Plan

#: The tiny GQA model the bridge tests share (built once per session by ``tiny_model_factory``).
GQA_MODEL = dict(n_layer=2, n_head=4, n_kv_head=2, head_dim=64, vocab="llama2-small", n_vocab=4096, seed=1)


def prompt_tokens(n: int, seed: int = 0, n_vocab: int = 4096) -> np.ndarray:
    """int32[n] random token ids (no special tokens)."""
    return np.random.default_rng(seed).integers(3, n_vocab, n).astype(np.int32)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_plan(L: int, H: int, N: int, m: int, *, seed: int = 0, merge: bool = True,
                same_layout: bool = False) -> Plan:
    """A valid plan: per (l, h) a sorted random choice of m-1 older cells plus the newest one; with
    ``merge`` every third slot also absorbs up to two following unchosen cells with weights summing to 1
    (values scaled differently from keys, to exercise wk != wv)."""
    rng = np.random.default_rng(seed)
    offsets = np.zeros((L, H, m + 1), dtype=np.int64)
    src, wk, wv = [], [], []
    pos = np.zeros((L, H, m), dtype=np.int32)
    shared = np.sort(rng.choice(N - 1, m - 1, replace=False))
    n = 0
    for l in range(L):
        for h in range(H):
            keep = shared if same_layout else np.sort(rng.choice(N - 1, m - 1, replace=False))
            keep = np.append(keep, N - 1)
            kept = set(keep.tolist())
            offsets[l, h, 0] = n
            for j, c in enumerate(keep):
                members = [int(c)]
                if merge and j % 3 == 1 and j < m - 1:
                    nxt = int(c) + 1
                    while nxt < keep[j + 1] and len(members) < 3 and nxt not in kept:
                        members.append(nxt)
                        nxt += 1
                g = rng.uniform(0.2, 1.0, len(members)).astype(np.float32)
                if len(members) == 1:
                    g[:] = 1.0  # a copy slot (the draw still advances the generator, as before)
                else:
                    g /= g.sum()
                src += members
                wk += g.tolist()
                wv += (g * 1.5).tolist() if len(members) > 1 else [1.0]
                n += len(members)
                offsets[l, h, j + 1] = n
                pos[l, h, j] = c
    return Plan(n_in=N, offsets=offsets, src=np.array(src, np.int32), wk=np.array(wk, np.float32),
                wv=np.array(wv, np.float32), pos=pos)
