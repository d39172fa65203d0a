"""Memory budgets: cache storages (K/V types), the plan that meets a fraction of the f16 cache's bytes by
quantizing first, and sessions and command lines opened with it on real llama.cpp contexts."""
from __future__ import annotations

import numpy as np
import pytest

from kvmerge_local.bridge import KV_TYPES, KVGeometry
from kvmerge_local.budget import Budget
from kvmerge_local.cli import sizing
from kvmerge_local.defaults import DEFAULT_MEMORY
from kvmerge_local.memory import LADDER, KVStorage, MemoryPlan, ladder_for


@pytest.mark.parametrize("text, k, v, name", [("f16", "f16", "f16", "f16"), ("q8_0/q4_0", "q8_0", "q4_0", "q8_0/q4_0"),
                                              (" q4_0 ", "q4_0", "q4_0", "q4_0"), ("q8_0/q8_0", "q8_0", "q8_0", "q8_0")])
def test_storage_parses_one_type_or_k_over_v(text, k, v, name):
    s = KVStorage.parse(text)
    assert (s.type_k, s.type_v, s.name) == (k, v, name)
    assert KVStorage.parse(s.name) == s and KVStorage.parse(s) is s


@pytest.mark.parametrize("bad, msg", [("q3_k", "unknown cache type 'q3_k'"), ("f16/q5", "unknown cache type 'q5'"),
                                      ("f16/f16/f16", "one type or K/V"), ("", "unknown cache type ''")])
def test_storage_refuses_unknown_types_naming_the_known_ones(bad, msg):
    with pytest.raises(ValueError, match=msg) as e:
        KVStorage.parse(bad)
    assert "q8_0" in str(e.value)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_ratio_is_the_bridge_row_bytes_against_f16(head_dim):
    """The plan's byte ratios equal the bytes the bridge's geometry gives cells of those ggml types."""
    g = KVGeometry(n_layer=3, n_kv_head=2, head_dim=head_dim)
    f16 = g.bytes_per_cell(KV_TYPES["f16"], KV_TYPES["f16"])
    for k in ("f16", "q8_0", "q4_0", "f32"):
        for v in ("f16", "q8_0", "q4_0"):
            got = g.bytes_per_cell(KV_TYPES[k], KV_TYPES[v]) / f16
            assert KVStorage(k, v).ratio == pytest.approx(got, abs=1e-12), (k, v)


def test_plan_takes_the_most_precise_full_cache_that_fits_else_evicts_in_the_smallest():
    assert [s.ratio for s in LADDER] == sorted((s.ratio for s in LADDER), reverse=True)
    cases = {1.0: ("f16", 1.0), 0.9: ("q8_0/f16", 1.0), 0.6: ("q8_0", 1.0), 0.53125: ("q8_0", 1.0),
             0.5: ("q8_0/q4_0", 1.0), 0.40625: ("q8_0/q4_0", 1.0), 0.3: ("q4_0", 1.0), 0.25: ("q4_0", 0.8889),
             0.1: ("q4_0", 0.3556)}
    for m, (name, cells) in cases.items():
        p = MemoryPlan.for_fraction(m)
        assert (p.storage.name, p.budget.value) == (name, pytest.approx(cells, abs=1e-4)), m
        assert p.storage.ratio * p.budget.value <= m + 1e-4
    assert MemoryPlan.for_fraction("0.25") == MemoryPlan.for_fraction(0.25)
    unrotated = MemoryPlan.for_fraction(0.25, ladder_for(32, True, False))
    assert (unrotated.storage.name, unrotated.budget.value) == ("q8_0/q4_0", pytest.approx(0.6154, abs=1e-4))
    only_f16 = MemoryPlan.for_fraction(0.3, ladder=(KVStorage(),))
    assert (only_f16.storage.name, only_f16.budget) == ("f16", Budget(0.3))


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, "half", True, None, float("nan")])
def test_plan_refuses_fractions_out_of_range(bad):
    with pytest.raises(ValueError, match="memory must be a fraction in"):
        MemoryPlan.for_fraction(bad)


def test_ladder_keeps_only_storages_a_context_can_open():
    assert ladder_for(64, True, True) == LADDER
    assert [s.name for s in ladder_for(64, False, True)] == ["f16", "q8_0/f16"]  # quantized V needs flash attention
    assert [s.name for s in ladder_for(48, True, False)] == ["f16"]  # rows of 48 are not whole 32-element blocks
    assert [s.name for s in ladder_for(32, True, False)] == ["f16", "q8_0/f16", "q8_0", "q8_0/q4_0"]  # no 4-bit K


@pytest.mark.parametrize("env, q4_keys", [(None, True), ("1", False), ("0", True)])
def test_plan_memory_uses_4bit_keys_only_where_llama_cpp_rotates_them(monkeypatch, env, q4_keys):
    from kvmerge_local.engine.sizing import plan_memory

    if env is None:
        monkeypatch.delenv("LLAMA_ATTN_ROT_DISABLE", raising=False)
    else:
        monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", env)
    assert plan_memory(0.25, 64).storage.name == ("q4_0" if q4_keys else "q8_0/q4_0")
    assert plan_memory(0.25, 96).storage.name == "q8_0/q4_0"  # 96 % 64 != 0: stored unrotated


def test_cli_sizing_defaults_to_the_memory_budget_and_refuses_mixing():
    assert sizing(None, None, None) == {"memory": DEFAULT_MEMORY}
    assert sizing(0.4, None, None) == {"memory": 0.4}
    assert sizing(None, Budget(0.3), None) == {"budget": Budget(0.3), "kv_type": "f16"}
    assert sizing(None, None, "q8_0") == {"budget": Budget(0.5), "kv_type": "q8_0"}
    for b, k in ((Budget(0.3), None), (None, "q4_0")):
        with pytest.raises(ValueError, match="--memory picks the cache type and the budget"):
            sizing(0.4, b, k)


@pytest.mark.llama
@pytest.mark.parametrize("memory, flash_attn", [(0.25, True), (0.5, True), (0.25, False)])
def test_session_meets_its_memory_budget(tiny_model_factory, memory, flash_attn):
    """Session.open(memory=...) opens the planned cache types and, after ingest, holds that share of the bytes
    an f16 cache of every document token takes (up to one cell of rounding), and still answers."""
    from kvmerge_local import Session
    from kvmerge_local.engine.sizing import plan_memory

    path = tiny_model_factory(vocab="llama2-small", n_vocab=4096, n_ctx_train=512)
    rng = np.random.default_rng(1)
    text = " ".join(rng.choice("the river runs north past the stone house where light falls".split(), 200))
    with Session.open(path, n_ctx=512, memory=memory, flash_attn=flash_attn, n_threads=2) as s:
        plan = plan_memory(memory, 64, flash_attn)
        assert (s.ctx.kv_type, s.ctx.type_v, s.budget) == (plan.storage.type_k, plan.storage.type_v, plan.budget)
        st = s.ingest(text)
        assert st.kv_type == plan.storage.name
        assert st.kv_bytes_full == pytest.approx(plan.storage.ratio * st.kv_bytes_f16)
        if plan.budget.value == 1.0:
            assert st.doc_cells == st.tokens_ingested
            assert st.memory_ratio == pytest.approx(plan.storage.ratio) and st.memory_ratio <= memory
        else:  # cells = round(budget * tokens): within half a cell of the budget
            assert st.doc_cells == round(plan.budget.value * st.tokens_ingested) < st.tokens_ingested
            assert abs(st.memory_ratio - memory) <= plan.storage.ratio * (0.5 / st.tokens_ingested + 1e-4)
        logits = s.peek_logits("What is it?")  # the compacted quantized cache still decodes
        assert logits.shape == (s.model.n_vocab,) and np.isfinite(logits).all()
