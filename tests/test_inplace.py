"""Compaction in place on the cache's own memory (patch v2) against the state-blob path, on real llama.cpp.

The in-place path (``KVBridge(ctx)``, default on the CPU) and the state path (``KVBridge(ctx, inplace=False)``)
get the same plan on two contexts filled alike: the caches read back afterwards (through the state blob) must
be byte-identical, and so must the next decodes' logits.  Also the llama.cpp invariants the cell rewrite keeps
(cell order, seq_pos_min/max, head, graph reuse), the fallbacks, and restoring after a failure.
"""
from __future__ import annotations

import numpy as np
import pytest

from _bridge_util import GQA_MODEL, prompt_tokens, random_plan
from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel, float_views
from kvmerge_local.bridge import inplace as bridge_inplace
from kvmerge_local.bridge import rope as rope_mod
from kvmerge_local.bridge.inplace import LiveKeys
from kvmerge_local.bridge.rope import RopeParams
from kvmerge_local.errors import KVMergeError
from kvmerge_local.kernels import inplace as kernels_inplace
from kvmerge_local.methods import REGISTRY, get_method, resolve_budget

pytestmark = pytest.mark.llama

# (kv type K, kv type V, flash attention): flash attention off stores V transposed
CONFIGS = [("f16", "f16", True), ("f16", "f16", False), ("f32", "f32", True), ("f32", "f32", False),
           ("bf16", "bf16", True), ("bf16", "bf16", False), ("q8_0", "q8_0", True), ("q4_0", "q4_0", True),
           ("q8_0", "f16", False)]


@pytest.fixture(scope="module")
def gqa(tiny_model_factory):
    m = LlamaModel(tiny_model_factory(**GQA_MODEL))
    yield m
    m.close()


def _ctx(model, toks, kt="f16", vt="f16", fa=True, n_ctx=256):
    ctx = LlamaContext(model, n_ctx=n_ctx, flash_attn=fa, kv_type=kt, type_v=vt, n_threads=1)
    ctx.decode(toks, logits="none")
    return ctx


def _both(model, toks, kt, vt, fa, compact, n_next=2):
    """Run ``compact(bridge)`` on two contexts filled with ``toks`` (state path, then in place); the two
    caches read back, and the logits of the next ``n_next`` tokens decoded one at a time."""
    out = []
    nxt = prompt_tokens(n_next, seed=99)
    for inplace in (False, True):
        ctx = _ctx(model, toks, kt, vt, fa)
        br = KVBridge(ctx, inplace=inplace)
        compact(br)
        st = br.read()
        logits = [ctx.decode(nxt[i:i + 1]) for i in range(n_next)]
        out.append((st, logits, ctx))
    return out


def _assert_same(a, b):
    (sa, la, _), (sb, lb, _) = a, b
    assert sa.n_cells == sb.n_cells
    assert np.array_equal(sa.blob, sb.blob)
    for x, y in zip(la, lb):
        assert np.array_equal(x, y)


def test_cache_tensors_are_views_of_the_cache(gqa):
    for kt, vt, fa in CONFIGS:
        ctx = _ctx(gqa, prompt_tokens(70, seed=1), kt, vt, fa)
        br = KVBridge(ctx)
        ct = br.tensors()
        st = br.read()
        assert ct.on_host and ct.buffers and all("CPU" in b.upper() for b in ct.buffers), ct.buffers
        assert ct.v_trans == (not fa) and ct.kv_size == ctx.n_ctx and ct.n_layer == 2
        assert (ct.k_type, ct.v_type) == (st.k_type, st.v_type)
        H, N = gqa.geom.n_kv_head, st.n_cells
        for l in range(2):
            k = bridge_inplace.layer_keys(ct, gqa.geom, l, N)
            assert np.shares_memory(k, ct.k[l]) and not np.shares_memory(k, st.blob)
            assert np.array_equal(np.ascontiguousarray(k).view(np.uint8), np.ascontiguousarray(st.k4[l]).view(np.uint8))
            if fa:
                v = ct.v[l][:N].reshape(N, H, -1).transpose(1, 0, 2)
            else:
                v = ct.v[l][:, :N].reshape(H, -1, N).transpose(0, 2, 1)
            assert np.array_equal(np.ascontiguousarray(v).view(np.uint8), np.ascontiguousarray(st.v4[l]).view(np.uint8))
        ctx.close()


@pytest.mark.parametrize("reindex", [False, True])
@pytest.mark.parametrize("kind", ["select", "merge", "shared"])
@pytest.mark.parametrize("kt,vt,fa", CONFIGS)
def test_inplace_is_bit_identical_to_state_path(gqa, kt, vt, fa, kind, reindex):
    N, m = 120, 50
    toks = prompt_tokens(N, seed=4)
    plan = random_plan(2, 2, N, m, seed=5, merge=(kind == "merge"), same_layout=(kind == "shared"))
    rope = RopeParams.from_model(gqa) if reindex else None
    a, b = _both(gqa, toks, kt, vt, fa, lambda br: br.compact(plan, reindex=reindex, rope=rope))
    _assert_same(a, b)
    expect = np.arange(m) if reindex else plan.cell_positions()
    assert np.array_equal(b[0].pos, expect)


@pytest.mark.parametrize("kt,vt,fa", [("f16", "f16", True), ("f16", "f16", False), ("q8_0", "q8_0", True)])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_in_place_matches_state_path(tiny_model_factory, name, kt, vt, fa):
    model = LlamaModel(tiny_model_factory(**dict(GQA_MODEL, n_layer=3)))
    method = REGISTRY[name]
    N = 140
    toks = prompt_tokens(N, seed=32)
    win = method.window if method.evidence_kind == "window" else {"none": None, "all": 0, "last": 1,
                                                                   "reconstruct": 0}[method.evidence_kind]
    plans = []

    def compact(br):
        st = br.read()
        ev = br.evidence(st) if win is not None else None
        k, v = float_views(st)
        plan = method.plan(k, v, st.pos, ev, resolve_budget(0.5, N))
        plans.append(plan)
        if br.inplace:  # planning on the live keys (no state read, no values) gives the same plan
            live = br.planning_state()
            assert isinstance(live, LiveKeys) and not np.shares_memory(live.k4, st.blob)
            k2, v2 = float_views(live)
            p2 = method.plan(k2, v2, live.pos, br.evidence(live) if win is not None else None,
                             resolve_budget(0.5, N))
            for f in ("offsets", "src", "wk", "wv", "pos"):
                assert np.array_equal(getattr(p2, f), getattr(plan, f)), f
        br.compact(plan, st, reindex=True, rope=RopeParams.from_model(model))
        if win is not None:
            br.disable_evidence()

    out = []
    for inplace in (False, True):
        ctx = LlamaContext(model, n_ctx=256, flash_attn=fa, kv_type=kt, type_v=vt, n_threads=1)
        br = KVBridge(ctx, inplace=inplace)
        if win is not None:
            br.enable_evidence(win)
        ctx.decode(toks, logits="none")
        compact(br)
        out.append((br.read(), [ctx.decode(prompt_tokens(1, seed=7))], ctx))
    _assert_same(*out)
    model.close()


def test_cell_rewrite_keeps_llama_invariants(gqa):
    """seq_pos_min/max, the cells' slots and positions, head (the next token lands in slot m), graph reuse
    (several decodes after the rewrite match the state path's), all as after set_data."""
    from kvmerge_local.bridge import _lib

    N, m = 110, 40
    toks = prompt_tokens(N, seed=8)
    plan = random_plan(2, 2, N, m, seed=9, merge=True)
    res = []
    for inplace in (False, True):
        ctx = _ctx(gqa, toks)
        br = KVBridge(ctx, inplace=inplace)
        br.compact(plan)
        slots, pos = _lib.seq_cells(ctx.ptr, 0)
        assert np.array_equal(slots, np.arange(m)) and np.array_equal(pos, plan.cell_positions())
        pmin, pmax = _lib.memory_seq_pos_min(ctx.ptr, 0), _lib.memory_seq_pos_max(ctx.ptr, 0)
        assert (pmin, pmax) == (int(plan.cell_positions()[0]), N - 1)
        assert ctx.n_past == N
        logits = [ctx.decode(prompt_tokens(3, seed=10), logits="all")]
        slots2, pos2 = _lib.seq_cells(ctx.ptr, 0)
        assert np.array_equal(slots2[m:], np.arange(m, m + 3)) and np.array_equal(pos2[m:], np.arange(N, N + 3))
        logits += [ctx.decode(prompt_tokens(1, seed=11 + i)) for i in range(3)]
        res.append((pmin, pmax, logits, br.read().blob))
        # a second compaction of the grown cache (cells 0..m+5 in order) in place again
        p2 = random_plan(2, 2, m + 6, 20, seed=12)
        br.compact(p2)
        res[-1] += (br.read().blob, ctx.decode(prompt_tokens(1, seed=13)))
        ctx.close()
    a, b = res
    assert a[:2] == b[:2]
    for x, y in zip(a[2], b[2]):
        assert np.array_equal(x, y)
    assert np.array_equal(a[3], b[3]) and np.array_equal(a[4], b[4]) and np.array_equal(a[5], b[5])


def test_inplace_path_never_reads_the_state(gqa, monkeypatch):
    ctx = _ctx(gqa, prompt_tokens(90, seed=14))
    br = KVBridge(ctx)
    calls = []
    monkeypatch.setattr(KVBridge, "read", lambda self: calls.append(1) or pytest.fail("state read"))
    br.compact(random_plan(2, 2, 90, 30, seed=15))
    assert calls == []
    monkeypatch.undo()
    assert br.read().n_cells == 30


def test_state_path_when_forced_or_cells_not_in_order(gqa, monkeypatch):
    called = []
    real = bridge_inplace.compact_inplace
    monkeypatch.setattr("kvmerge_local.bridge.kv.compact_inplace", lambda *a, **k: called.append(1) or real(*a, **k))
    ctx = _ctx(gqa, prompt_tokens(90, seed=16))
    KVBridge(ctx, inplace=False).compact(random_plan(2, 2, 90, 30, seed=17))
    assert called == []
    # cells at slots 0..9 and 20..89 after removing positions 10..19: not 0..N-1, so the state path
    ctx2 = _ctx(gqa, prompt_tokens(90, seed=16))
    KVBridge(ctx2).remove_from(10, 20)
    br = KVBridge(ctx2)
    br.compact(random_plan(2, 2, 80, 30, seed=18))
    assert called == [] and br.read().n_cells == 30
    with pytest.raises(KVMergeError, match="slots 0"):
        ctx3 = _ctx(gqa, prompt_tokens(90, seed=16))
        KVBridge(ctx3).remove_from(10, 20)
        KVBridge(ctx3, inplace=True).compact(random_plan(2, 2, 80, 30, seed=18))
    KVBridge(ctx).compact(random_plan(2, 2, 30, 20, seed=19))
    assert called == [1]


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("where", ["kernel", "cells"])
def test_failure_after_writing_restores_the_cache(gqa, monkeypatch, with_state, where):
    toks = prompt_tokens(100, seed=20)
    ctx = _ctx(gqa, toks[:-1], fa=False)
    br = KVBridge(ctx)
    before = br.read()
    expect = ctx.decode(toks[-1:])
    ctx.clear()
    br.write(before)
    real = kernels_inplace.apply_inplace

    def half_then_fail(*a, **k):
        real(*a, **k)  # every row of the compaction written, then a failure
        raise RuntimeError("injected")

    if where == "kernel":
        monkeypatch.setattr(kernels_inplace, "apply_inplace", half_then_fail)
    else:  # llama.cpp refuses the cell rewrite after the rows were moved
        monkeypatch.setattr(bridge_inplace._lib, "seq_set_cells", lambda *a: False)
    plan = random_plan(2, 2, 99, 30, seed=21, merge=True)
    with pytest.raises((RuntimeError, KVMergeError)):
        br.compact(plan, before if with_state else None)
    monkeypatch.undo()
    assert np.array_equal(br.read().blob, before.blob)
    assert np.array_equal(ctx.decode(toks[-1:]), expect)


def _failing_plan(kind: str, st, L: int, H: int):
    """A plan over the state ``st``: a selection, random merges, or KVMerger's / CaM's plan (random evidence)."""
    N, m = st.n_cells, st.n_cells * 2 // 5
    if kind in ("select", "merge"):
        return random_plan(L, H, N, m, seed=21, merge=kind == "merge")
    k, v = float_views(st)
    ev = np.random.default_rng(5).random((L, H, N)).astype(np.float32)
    method = get_method(kind, n_sink=2, n_recent=3) if kind == "kvmerger" else get_method(kind)
    return method.plan(k, v, st.pos, ev, m)


FAIL_CONFIGS = [("f16", "f16", True), ("f16", "f16", False), ("bf16", "bf16", True), ("bf16", "bf16", False),
                ("q8_0", "q8_0", True), ("q4_0", "q4_0", True), ("q8_0", "f16", False)]


@pytest.mark.parametrize("where", ["kernel", "rope", "cells"])
@pytest.mark.parametrize("kind", ["select", "merge", "kvmerger", "cam+streaming_llm"])
@pytest.mark.parametrize("kt,vt,fa", FAIL_CONFIGS)
def test_undo_restores_every_layout_and_plan(gqa, monkeypatch, kt, vt, fa, kind, where):
    """No state given: the permutation's own undo (and, re-indexing, the key snapshot) must give back the cache
    byte for byte, and the next logits, whichever step fails after the rows were moved."""
    toks = prompt_tokens(100, seed=20)
    ctx = _ctx(gqa, toks[:-1], kt, vt, fa)
    br = KVBridge(ctx)
    before = br.read()
    expect = ctx.decode(toks[-1:])
    ctx.clear()
    br.write(before)
    plan = _failing_plan(kind, before, br.geom.n_layer, br.geom.n_kv_head)
    if where == "kernel":
        real = kernels_inplace.apply_inplace
        monkeypatch.setattr(kernels_inplace, "apply_inplace", lambda *a, **k: real(*a, **k) and _raise())
    elif where == "rope":  # the first layer's keys re-rotated, then a failure
        real_rot, n = rope_mod.rerotate_state_keys, []
        monkeypatch.setattr(rope_mod, "rerotate_state_keys",
                            lambda *a: real_rot(*a) if not n.append(1) and len(n) == 1 else _raise())
    else:
        monkeypatch.setattr(bridge_inplace._lib, "seq_set_cells", lambda *a: False)
    with pytest.raises((RuntimeError, KVMergeError)):
        br.compact(plan, reindex=where != "kernel", rope=RopeParams.from_model(gqa))
    monkeypatch.undo()
    after = br.read()
    assert after.n_cells == before.n_cells and np.array_equal(after.blob, before.blob)
    assert np.array_equal(ctx.decode(toks[-1:]), expect)


def _raise():
    raise RuntimeError("injected")


def test_bad_plan_changes_nothing(gqa):
    ctx = _ctx(gqa, prompt_tokens(80, seed=22))
    br = KVBridge(ctx)
    before = br.read()
    plan = random_plan(2, 2, 80, 20, seed=23)
    plan.src[3] = 500
    with pytest.raises(ValueError, match="out of range"):
        br.compact(plan)
    with pytest.raises(ValueError, match="does not match"):
        br.compact(random_plan(2, 2, 70, 20, seed=23))
    assert np.array_equal(br.read().blob, before.blob)
