"""Every accepted GGUF architecture on real llama.cpp, and every refused family by name.

Accepted (``SUPPORTED_ARCHS``): each has a tiny model (:mod:`kvmerge_local.tiny.arch`) and must
(1) cache exactly the post-RoPE keys the NumPy reference computes with that architecture's RoPE pairing,
biases and Q/K norms, (2) survive a no-op compaction bit for bit, (3) re-index through the engine's path
(``DocumentCache.compact(reindex=True)`` -> ``KVBridge.compact``, what ``Session`` runs with ``position_policy="reindex"``) to the
cache a fresh prefill of the kept tokens at their new positions gives, and to llama.cpp's own K-shift.
Refused (``REFUSED_ARCHS``): a ModelError that names the architecture and the reason, before llama.cpp loads.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from _bridge_util import prompt_tokens, rel_err
from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel, apply_plan_to_state, float_views
from kvmerge_local.bridge import context as bctx
from kvmerge_local.bridge.rope import RopeParams, segment_shifts
from kvmerge_local.engine.cache import DocumentCache
from kvmerge_local.errors import ModelError
from kvmerge_local.methods.base import plan_from_indices
from support import reference as ref
from kvmerge_local.tiny.arch import ARCH_SPECS, TINY_ARCHS, make_refused_gguf
from kvmerge_local.tiny.model import load_weights, make_bad_gguf

pytestmark = pytest.mark.llama

ACCEPTED = bctx.SUPPORTED_ARCHS
SMALL = dict(vocab="llama2-small", n_vocab=4096)


def _path(factory, arch, n_layer=2):
    return factory(arch=arch, n_layer=n_layer, seed=7, **SMALL)


@pytest.fixture(scope="module", params=ACCEPTED)
def arch_model(request, tiny_model_factory):
    m = LlamaModel(_path(tiny_model_factory, request.param))
    yield request.param, m
    m.close()


class _Keep:
    """A method for ``DocumentCache.compact`` that keeps the given cells (per (layer, head) or shared)."""

    def __init__(self, idx: np.ndarray):
        self.idx = idx

    def plan(self, k, v, doc_pos, evidence, m):
        L, H, N = doc_pos.shape
        idx = np.ascontiguousarray(np.broadcast_to(self.idx, (L, H, m)), dtype=np.int32)
        return plan_from_indices(idx, doc_pos, N)


def _reindex_with_engine(ctx, model, keep):
    """Compact ``ctx``'s cache (positions 0..N-1) to ``keep`` and re-index to 0..m-1, as Session does."""
    br = KVBridge(ctx)
    n = br.read().n_cells
    L, H = model.geom.n_layer, model.geom.n_kv_head
    cache = DocumentCache.for_context(ctx)
    cache.append(np.arange(n), np.arange(n))
    m = np.shape(keep)[-1]
    res = cache.compact(br, _Keep(np.asarray(keep)), m, reindex=True, evidence_on=False)
    assert res.reindexed and res.n_after == m and cache.n_cells == m and cache.n_reindex == 1
    np.testing.assert_array_equal(cache.rope_pos, np.broadcast_to(np.arange(m), (L, H, m)))
    assert ctx.n_past == m


def _prefill_and_reindex(ctx, model, toks, keep):
    """Prefill ``toks``, re-index to ``keep`` with the engine; (the prefilled state, float32 keys after)."""
    ctx.decode(toks, logits="none")
    st = KVBridge(ctx).read().copy()
    _reindex_with_engine(ctx, model, keep)
    return st, np.asarray(float_views(KVBridge(ctx).read())[0], np.float32).copy()


def _llama_k_shift(ctx, st, keep, next_toks):
    """llama.cpp's path: write the cells ``keep`` (int[m], all heads) of ``st`` at their old positions,
    ``seq_add`` the gaps away, decode ``next_toks`` (which applies the K-shift); float32 keys [L, H, m, d]."""
    m, (L, H) = len(keep), st.k4.shape[:2]
    ctx.clear()
    plan = plan_from_indices(np.broadcast_to(keep, (L, H, m)).astype(np.int32), st.pos, st.n_cells)
    KVBridge(ctx).write(apply_plan_to_state(st, plan))
    for p0, p1, d in segment_shifts(plan.cell_positions(), np.arange(m)):
        KVBridge(ctx).shift_positions(p0, p1, d)
    ctx.decode(next_toks)
    return np.asarray(float_views(KVBridge(ctx).read())[0], np.float32)[:, :, :m]


# -- accepted ------------------------------------------------------------------------------------------------


def test_every_accepted_arch_has_a_tiny_model_and_no_refusal():
    assert set(ACCEPTED) == set(TINY_ARCHS)
    assert not set(ACCEPTED) & set(bctx.REFUSED_ARCHS)


def test_loads_with_its_rope_pairing(arch_model):
    arch, model = arch_model
    assert model.info["arch"] == arch
    rope = RopeParams.from_model(model)
    assert rope.neox == ARCH_SPECS[arch].neox == (model.info["rope_type"] == 2)
    assert (rope.head_dim, rope.n_rot) == (64, 64)


@pytest.mark.parametrize("fa", [False, True])
def test_cache_holds_the_reference_keys(arch_model, tiny_model_factory, fa):
    """llama.cpp's cached K/V and logits vs the NumPy reference of the same architecture; the reference with
    the other RoPE pairing is far off (so the comparison does see NEOX vs NORM)."""
    arch, model = arch_model
    w = load_weights(_path(tiny_model_factory, arch))
    toks = prompt_tokens(48, seed=21)
    with LlamaContext(model, n_ctx=64, n_threads=1, flash_attn=fa) as ctx:
        logits = ctx.decode(toks, logits="all")
        st = KVBridge(ctx).read()
    out = ref.prefill(w, toks, flash_attn=fa)
    k, v = float_views(st)
    assert rel_err(np.asarray(k, np.float32), out.k) < 2e-3
    assert rel_err(np.asarray(v, np.float32), out.v) < 2e-3
    assert rel_err(logits, out.logits) < 3e-3
    other = "llama" if ARCH_SPECS[arch].neox else "qwen3"
    wrong = dataclasses.replace(w, config=dataclasses.replace(w.config, arch=other))
    assert rel_err(np.asarray(k, np.float32), ref.prefill(wrong, toks, flash_attn=fa).k) > 0.1


@pytest.mark.parametrize("fa", [False, True])
def test_noop_compaction_is_bit_identical(arch_model, fa):
    """Read the cache, write it back (and an identity plan through the bridge and the engine): the next
    tokens' logits are bit-identical to those of the untouched context."""
    arch, model = arch_model
    toks = prompt_tokens(103, seed=22)
    N = 100
    with LlamaContext(model, n_ctx=128, n_threads=1, flash_attn=fa) as ctx:
        ctx.decode(toks[:N], logits="none")
        br = KVBridge(ctx)
        st = br.read().copy()
        expect = [ctx.decode(toks[i:i + 1]) for i in range(N, N + 3)]

        def next_logits():
            return [ctx.decode(toks[i:i + 1]) for i in range(N, N + 3)]

        ctx.clear()
        br.write(st)
        assert all(np.array_equal(a, b) for a, b in zip(next_logits(), expect))
        ctx.clear()
        br.write(st)
        ident = plan_from_indices(np.broadcast_to(np.arange(N), (*st.k4.shape[:2], N)).astype(np.int32), st.pos, N)
        assert ident.is_identity()
        assert np.array_equal(apply_plan_to_state(st, ident).blob, st.blob)
        br.compact(ident)
        assert all(np.array_equal(a, b) for a, b in zip(next_logits(), expect))
        ctx.clear()
        br.write(st)
        _reindex_with_engine(ctx, model, np.arange(N))  # keep all: positions already 0..N-1, nothing to do
        assert all(np.array_equal(a, b) for a, b in zip(next_logits(), expect))


@pytest.mark.parametrize("arch", ACCEPTED)
def test_reindex_matches_fresh_prefill_of_kept_tokens(tiny_model_factory, arch):
    """One layer: a token's K/V depend only on the token and its position, so dropping tokens and re-indexing
    the kept ones must give the cache (and next-token logits) of a fresh prefill of the kept tokens at
    0..m-1.  In two layers the first layer's keys must match too (later layers saw the dropped tokens)."""
    N, m = 120, 50
    toks = prompt_tokens(N + 1, seed=23)
    rng = np.random.default_rng(9)
    keep = np.r_[0:4, np.sort(rng.choice(np.arange(4, N - 1), m - 5, replace=False)), N - 1].astype(np.int32)
    for n_layer in (1, 2):
        model = LlamaModel(_path(tiny_model_factory, arch, n_layer=n_layer))
        with LlamaContext(model, n_ctx=160, n_threads=1) as ctx, LlamaContext(model, n_ctx=160, n_threads=1) as fresh:
            ctx.decode(toks[:N], logits="none")
            _reindex_with_engine(ctx, model, keep)
            ours = KVBridge(ctx).read()
            fresh.decode(toks[keep], logits="none")
            theirs = KVBridge(fresh).read()
            np.testing.assert_array_equal(ours.pos, theirs.pos)
            layers = slice(None) if n_layer == 1 else slice(0, 1)
            assert rel_err(ours.k4[layers].astype(np.float32), theirs.k4[layers].astype(np.float32)) < 2e-3
            assert np.array_equal(ours.v4[layers], theirs.v4[layers])  # V never moves
            la, lb = ctx.decode(toks[N:]), fresh.decode(toks[N:])
            if n_layer == 1:
                assert rel_err(la, lb) < 5e-3
        model.close()


def test_per_head_reindex_matches_llama_k_shift(arch_model):
    """Two layers, a different kept set in every (layer, KV head): the engine's per-head re-rotation equals
    llama.cpp's own K-shift (``seq_add``, NORM or NEOX as the model says) applied to each head's set."""
    arch, model = arch_model
    N, m = 120, 48
    toks = prompt_tokens(N + 1, seed=24)
    rng = np.random.default_rng(6)
    L, H = model.geom.n_layer, model.geom.n_kv_head
    idx = np.stack([np.stack([np.r_[np.sort(rng.choice(N - 1, m - 1, replace=False)), N - 1] for _ in range(H)])
                    for _ in range(L)]).astype(np.int32)
    with LlamaContext(model, n_ctx=160, n_threads=1) as ctx:
        st, ours = _prefill_and_reindex(ctx, model, toks[:N], idx)
        assert np.all(np.isfinite(ctx.decode(toks[N:])))
        for l in range(L):
            for h in range(H):
                theirs = _llama_k_shift(ctx, st, idx[l, h], toks[N:])
                assert rel_err(ours[l, h], theirs[l, h]) < 2e-3, (arch, l, h)


def test_reindex_with_rope_freqs_matches_llama_k_shift(tiny_model_factory):
    """Llama-3.1/3.2/3.3 GGUFs carry ``rope_freqs.weight`` (theta of pair i divided by factor i); llama.cpp's
    own K-shift applies it, so re-indexing must too."""
    model = LlamaModel(tiny_model_factory(rope_freqs=tuple(np.linspace(1.0, 8.0, 32).tolist()), seed=7, **SMALL))
    N, m = 100, 40
    toks = prompt_tokens(N + 1, seed=25)
    keep = np.r_[0:4, N - (m - 4):N].astype(np.int32)
    with LlamaContext(model, n_ctx=128, n_threads=1) as ctx:
        st, ours = _prefill_and_reindex(ctx, model, toks[:N], keep)
        theirs = _llama_k_shift(ctx, st, keep, toks[N:])
    model.close()
    assert rel_err(ours, theirs) < 2e-3


@pytest.mark.parametrize("arch", [a for a in ACCEPTED if a != "llama"])  # llama: tests/test_engine_session.py
def test_session_reindexes_end_to_end(tiny_model_factory, arch):
    """A Session on the architecture: a document of ~3 n_ctx ingests with compaction and re-indexing, and
    a question is answered."""
    from kvmerge_local import Session

    words = "the river runs north past the stone house where light falls on paper".split()
    path = tiny_model_factory(arch=arch, n_ctx_train=512, seed=7, **SMALL)
    with Session.open(path, n_ctx=256, position_policy="reindex", n_threads=1) as s:
        s.ingest(" ".join(np.random.default_rng(0).choice(words, 700)) + ".")
        assert s.stats.n_compactions >= 1 and s.stats.n_reindex >= 1
        assert len("".join(s.ask("What is it?", max_new_tokens=4))) > 0


# -- refused -------------------------------------------------------------------------------------------------

FAMILY_WORDS = {bctx._SWA: "sliding-window", bctx._MLA: "latent", bctx._RECURRENT: "recurrent",
                bctx._HYBRID: "hybrid", bctx._MROPE: "M-RoPE"}


@pytest.mark.parametrize("arch", sorted(bctx.REFUSED_ARCHS))
def test_refused_family_named_with_reason(tmp_path, arch):
    reason = bctx.REFUSED_ARCHS[arch]
    word = FAMILY_WORDS.get(reason, "chunked local attention .*sliding-window")  # llama4
    p = make_refused_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(ModelError, match=rf"architecture '{arch}' is not supported: .*{word}") as e:
        LlamaModel(p)
    assert "llama, qwen2, qwen3" in str(e.value)


def test_refusal_families_cover_the_named_examples():
    for arch, word in (("gemma2", "sliding-window"), ("gemma3", "sliding-window"), ("deepseek2", "latent"),
                       ("mamba", "recurrent"), ("rwkv6", "recurrent"), ("rwkv7", "recurrent"),
                       ("jamba", "hybrid"), ("granitehybrid", "hybrid"), ("qwen2vl", "M-RoPE")):
        assert word in bctx.REFUSED_ARCHS[arch], arch


def test_unlisted_arch_gets_the_generic_refusal(tmp_path):
    with pytest.raises(ModelError, match=r"architecture 'qwen2moe' is not supported; .*llama, qwen2, qwen3"):
        LlamaModel(make_refused_gguf(tmp_path / "moe.gguf", "qwen2moe"))


def test_loadable_swa_model_is_refused_by_name_and_after_loading(tmp_path, monkeypatch):
    """A real, loadable gemma2 file: refused by name; and if the name check let it through, the check on
    the loaded model (n_swa > 0) still refuses it, naming the architecture."""
    p = make_bad_gguf(tmp_path / "gemma2.gguf", "swa")
    with pytest.raises(ModelError, match="architecture 'gemma2' is not supported: sliding-window"):
        LlamaModel(p)
    monkeypatch.delitem(bctx.REFUSED_ARCHS, "gemma2")
    monkeypatch.setattr(bctx, "SUPPORTED_ARCHS", (*bctx.SUPPORTED_ARCHS, "gemma2"))
    with pytest.raises(ModelError, match=r"sliding-window attention is not supported .*architecture 'gemma2'"):
        LlamaModel(p)
