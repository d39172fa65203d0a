"""The NumPy reference forward (support.reference) against real llama.cpp on tiny GGUF models.

Measured agreement (max |llama.cpp - reference| / max |reference logit|, n_threads=1, CPU), 2-3 layer models,
prompts of 40-100 tokens: 1e-4 .. 6e-4 with flash attention off and on (the reference emulates the kernel in
use). A 1-layer model agrees to ~5e-7 except where one f16 rounding lands on the other side of a tie; those
flips are what is left at 2+ layers. The tests assert the project target, 2e-3.
"""
from __future__ import annotations

import numpy as np
import pytest

from support.reference import (attention_evidence, decode_many_with_cache, decode_with_cache,
                                             prefill)
from kvmerge_local.tiny.model import TinyConfig, load_weights

llama_cpp = pytest.importorskip("llama_cpp")
from support.llama_runner import LlamaRunner, try_load_model  # noqa: E402

TOL = 2e-3

MODELS = {
    "gqa-hd64": dict(),
    "mha-hd64": dict(n_kv_head=4, vocab="llama2-small"),
    "gqa-hd32": dict(head_dim=32, vocab="llama2-small"),
    "mha-hd32-f16": dict(head_dim=32, n_kv_head=4, weight_type="f16", vocab="llama2-small"),
}


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def prompt(cfg: TinyConfig, n: int, seed: int = 0) -> np.ndarray:
    toks = np.random.default_rng(seed).integers(3, cfg.n_vocab, n)
    toks[0] = cfg.bos_id
    return toks


@pytest.mark.llama
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("model", list(MODELS))
def test_prefill_and_decode_match_llama_cpp(model, flash_attn, tiny_model_factory, tiny_weights_factory):
    path, w = tiny_model_factory(**MODELS[model]), tiny_weights_factory(**MODELS[model])
    toks = prompt(w.config, 40)
    nxt = [17, 2424, 99]
    with LlamaRunner(path, n_ctx=256, flash_attn=flash_attn) as r:
        got_prompt = r.decode(toks)
        got_next = r.decode(nxt[:1])[0]
        got_many = r.decode(nxt[1:])
    ref = prefill(w, toks, flash_attn=flash_attn)
    assert rel_err(got_prompt, ref.logits) < TOL
    assert (got_prompt.argmax(1) == ref.logits.argmax(1)).mean() > 0.9

    ref_next = decode_with_cache(w, ref.k, ref.v, ref.positions, nxt[0], 40, flash_attn=flash_attn)
    assert rel_err(got_next, ref_next) < TOL

    step = decode_many_with_cache(w, ref.k, ref.v, ref.positions, nxt[:1], [40], flash_attn=flash_attn)
    k2, v2 = np.concatenate([ref.k, step.k], axis=2), np.concatenate([ref.v, step.v], axis=2)
    ref_many = decode_many_with_cache(w, k2, v2, np.arange(41), nxt[1:], [41, 42], flash_attn=flash_attn)
    assert rel_err(got_many, ref_many.logits) < TOL


@pytest.mark.llama
def test_rope_at_large_positions(tiny_llama_small, tiny_weights_factory):
    """An empty cache accepts any start position: RoPE at 3000.. must still match."""
    w = tiny_weights_factory(vocab="llama2-small")
    toks = prompt(w.config, 16, seed=3)
    with LlamaRunner(tiny_llama_small, n_ctx=256) as r:
        got = r.decode(toks, positions=range(3000, 3016))
    assert rel_err(got, prefill(w, toks, positions=np.arange(3000, 3016)).logits) < TOL


@pytest.mark.llama
def test_tokenizer_is_llama2(tiny_llama):
    with LlamaRunner(tiny_llama, n_ctx=256) as r:
        ids = r.tokenize("Hello world")
        assert ids == [1, 15043, 3186]  # <s> ▁Hello ▁world, as Llama-2 tokenizes it
        assert "".join(r.token_to_piece(t) for t in ids[1:]).strip() == "Hello world"
        assert r.n_vocab == 32000


@pytest.mark.llama
def test_small_vocab_tokenizes_via_byte_fallback(tiny_llama_small):
    with LlamaRunner(tiny_llama_small, n_ctx=256) as r:
        ids = r.tokenize("Hello world, Zürich!")
        assert r.n_vocab == 4096 and ids[0] == 1 and max(ids) < 4096
        assert "".join(r.token_to_piece(t) for t in ids[1:]).strip() == "Hello world, Zürich!"


# --- per-head caches: each KV head holds different tokens in the same cells (via the session state blob) ---

def _parse_state(blob: bytes, cfg: TinyConfig):
    """One-stream state of a plain llama context -> (pos [n], k, v as f16 [n_layer, n_kv, n, hd], v_trans)."""
    u32 = lambda off: int(np.frombuffer(blob, np.uint32, 1, off)[0])  # noqa: E731
    n = u32(12)
    off = 16
    pos = np.frombuffer(blob, np.int32, 3 * n, off).reshape(n, 3)[:, 0].copy()
    off += 12 * n
    v_trans, n_layer = u32(off), u32(off + 4)
    off += 8
    E, hd = cfg.n_embd_kv, cfg.head_dim
    k = np.empty((n_layer, cfg.n_kv_head, n, hd), np.float16)
    v = np.empty_like(k)
    for il in range(n_layer):
        assert u32(off) == 1  # f16
        rows = np.frombuffer(blob, np.float16, n * E, off + 12).reshape(n, cfg.n_kv_head, hd)
        k[il] = rows.transpose(1, 0, 2)
        off += 12 + 2 * n * E
    for il in range(n_layer):
        if v_trans:
            m = np.frombuffer(blob, np.float16, n * E, off + 12).reshape(cfg.n_kv_head, hd, n)
            v[il] = m.transpose(0, 2, 1)
        else:
            v[il] = np.frombuffer(blob, np.float16, n * E, off + 12).reshape(n, cfg.n_kv_head, hd).transpose(1, 0, 2)
        off += 12 + 2 * n * E
    assert off == len(blob)
    return pos, k, v, v_trans


def _build_state(pos, k, v, v_trans: bool) -> bytes:
    """Inverse of :func:`_parse_state` for sequence 0."""
    n_layer, n_kv, n, hd = k.shape
    E = n_kv * hd
    parts = [np.array([0xAF143CD8, 0, 1, n], np.uint32).tobytes()]
    cells = np.zeros((n, 3), np.int32)
    cells[:, 0], cells[:, 1] = pos, 1
    parts += [cells.tobytes(), np.array([int(v_trans), n_layer], np.uint32).tobytes()]
    for il in range(n_layer):
        parts += [np.int32(1).tobytes(), np.uint64(2 * E).tobytes(), k[il].transpose(1, 0, 2).tobytes()]
    for il in range(n_layer):
        if v_trans:
            parts += [np.int32(1).tobytes(), np.array([2, E], np.uint32).tobytes(),
                      v[il].transpose(0, 2, 1).tobytes()]
        else:
            parts += [np.int32(1).tobytes(), np.uint64(2 * E).tobytes(), v[il].transpose(1, 0, 2).tobytes()]
    return b"".join(parts)


@pytest.mark.llama
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_per_head_cells_decode(flash_attn, tiny_llama_small, tiny_weights_factory):
    """Compact a 48-cell cache to 20 cells with a different token selection per layer and KV head; llama.cpp's
    next-token logits must match decode_with_cache on the same per-head cache."""
    w = tiny_weights_factory(vocab="llama2-small")
    c = w.config
    toks = prompt(c, 48, seed=5)
    with LlamaRunner(tiny_llama_small, n_ctx=256, flash_attn=flash_attn) as r:
        r.decode(toks, all_logits=False)
        pos, k, v, v_trans = _parse_state(r.state(), c)
        assert bool(v_trans) == (not flash_attn)
        ref = prefill(w, toks, flash_attn=flash_attn)
        assert np.array_equal(pos, np.arange(48))
        assert np.abs(k.astype(np.float32) - ref.k).max() <= 0.01 * np.abs(ref.k).max()
        assert np.abs(v.astype(np.float32) - ref.v).max() <= 0.01 * np.abs(ref.v).max()

        rng = np.random.default_rng(7)
        m = 20
        sel = np.empty((c.n_layer, c.n_kv_head, m), np.int64)
        for il in range(c.n_layer):
            for h in range(c.n_kv_head):
                sel[il, h, :-1] = np.sort(rng.choice(47, m - 1, replace=False))
                sel[il, h, -1] = 47  # the newest cell keeps the maximum position
        assert len({tuple(s) for s in sel.reshape(-1, m)}) > 1
        gather = lambda a: np.take_along_axis(a, sel[..., None], axis=2)  # noqa: E731
        k_new, v_new = gather(k), gather(v)
        cell_pos = np.sort(rng.choice(47, m - 1, replace=False)).tolist() + [47]
        blob = _build_state(np.array(cell_pos, np.int32), k_new, v_new, bool(v_trans))
        r.clear()
        r.set_state(blob)
        got = r.decode([321], positions=[48])[0]
    want = decode_with_cache(w, k_new.astype(np.float32), v_new.astype(np.float32), np.array(cell_pos), 321, 48,
                             flash_attn=flash_attn)
    assert rel_err(got, want) < TOL
    # and it differs from the uncompacted continuation, so the test has teeth
    full = decode_with_cache(w, ref.k, ref.v, ref.positions, 321, 48, flash_attn=flash_attn)
    assert rel_err(full, want) > 10 * TOL


# --- properties of the model and the reference that need no llama.cpp ---

def test_model_is_not_degenerate(tiny_weights_factory):
    w = tiny_weights_factory()
    ref = prefill(w, prompt(w.config, 64, seed=1))
    assert ref.logits.std() > 1.0
    assert len(set(ref.logits.argmax(1).tolist())) > 32  # next-token predictions vary with context
    ev = attention_evidence(ref.q, ref.k, ref.positions, ref.positions, window=1)  # last query's attention
    p = ev / ev.sum(-1, keepdims=True)
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(-1) / np.log(64)
    assert entropy.max() < 0.9  # every head is clearly non-uniform


def test_attention_evidence_semantics(tiny_weights_factory):
    w = tiny_weights_factory(vocab="llama2-small")
    ref = prefill(w, prompt(w.config, 12, seed=2))
    ev_all = attention_evidence(ref.q, ref.k, ref.positions, ref.positions)
    assert ev_all.shape == (w.config.n_layer, w.config.n_head, 12)
    np.testing.assert_allclose(ev_all.sum(-1), 12, rtol=1e-5)
    # brute force for layer 1, head 3 (KV head 1), last 4 queries
    q, k = ref.q[1, 3, -4:], ref.k[1, 1]
    s = q @ k.T / np.sqrt(w.config.head_dim)
    s = np.where(np.arange(12)[None, :] <= np.arange(8, 12)[:, None], s, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    want = (p / p.sum(1, keepdims=True)).sum(0)
    got = attention_evidence(ref.q, ref.k, ref.positions, ref.positions, window=4)[1, 3]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.all(got[:8] > 0) and np.isclose(got.sum(), 4)


def test_decode_cache_positions_only_mask(tiny_weights_factory):
    """A cell is visible when its position is <= the new token's (llama.cpp's causal mask compares positions);
    where visible cells sit in position does not matter (K is stored after RoPE)."""
    w = tiny_weights_factory(vocab="llama2-small")
    ref = prefill(w, prompt(w.config, 10, seed=4))
    base = decode_with_cache(w, ref.k, ref.v, np.arange(10), 55, 10)
    np.testing.assert_array_equal(decode_with_cache(w, ref.k, ref.v, np.arange(10) * 0, 55, 10), base)
    hidden = decode_with_cache(w, ref.k, ref.v, np.r_[np.arange(9), 11], 55, 10)
    dropped = decode_with_cache(w, ref.k[:, :, :9], ref.v[:, :, :9], np.arange(9), 55, 10)
    np.testing.assert_array_equal(hidden, dropped)
    # decoding with the prefill's own cache equals prefilling one more token
    longer = prefill(w, np.r_[prompt(w.config, 10, seed=4), 55])
    assert rel_err(base, longer.logits[-1]) < 1e-4  # float32 summation order differs between the two paths (3e-5 with this venv's NumPy)


def test_load_weights_round_trip(tiny_model_factory):
    path = tiny_model_factory(n_layer=3, n_head=8, n_kv_head=2, head_dim=32, n_ff=96, rope_freq_base=5e5,
                              vocab="llama2-small", n_vocab=1000, seed=3)
    w = load_weights(path)
    c = w.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.d_model, c.n_ff, c.n_vocab) == (3, 8, 2, 32, 256, 96, 1000)
    assert c.rope_freq_base == 5e5 and c.arch == "llama" and c.bos_id == 1
    assert w.layers[2].wk.shape == (64, 256) and w.layers[0].w_down.shape == (256, 96)
    assert w.output.shape == (1000, 256) and w.output_f16 and not w.layers[0].f16


@pytest.mark.llama
@pytest.mark.parametrize("kind", ["truncated", "bad_magic", "unknown_arch", "missing_tensor", "swa"])
def test_bad_ggufs(kind, bad_gguf_factory):
    path = bad_gguf_factory(kind)
    assert try_load_model(path) == (kind == "swa")  # the SWA model loads; the project must refuse it itself
