"""Every registered method compacts a real llama.cpp cache; the next-token logits match the NumPy reference
forward of the same tiny model on the compacted cache, and the invariants hold on the written cache."""
from __future__ import annotations

import numpy as np
import pytest

from _bridge_util import GQA_MODEL, prompt_tokens, rel_err
from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel
from kvmerge_local.methods import REGISTRY, resolve_budget
from support import reference as ref

pytestmark = pytest.mark.llama

EVIDENCE_WINDOW = {"none": None, "all": 0, "last": 1, "reconstruct": 0}  # replay scores: any evidence drives the plan; the replay itself is tests/test_replay.py


@pytest.fixture(scope="module")
def tiny(tiny_model_factory, tiny_weights_factory):
    spec = dict(GQA_MODEL, n_layer=3)  # three layers: KVMerger's skip_layers leaves one merged layer
    model = LlamaModel(tiny_model_factory(**spec))
    yield model, tiny_weights_factory(**spec)
    model.close()


def _evidence_window(method) -> int | None:
    kind = method.evidence_kind
    return method.window if kind == "window" else EVIDENCE_WINDOW[kind]


@pytest.mark.parametrize("fa", [True, False])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_method_through_llama_matches_reference(tiny, name, fa):
    model, w = tiny
    method = REGISTRY[name]
    N = 160
    toks = prompt_tokens(N + 1, seed=32)
    ctx = LlamaContext(model, n_ctx=256, flash_attn=fa, n_threads=1)
    br = KVBridge(ctx)
    win = _evidence_window(method)
    if win is not None:
        br.enable_evidence(win)
    ctx.decode(toks[:N], logits="none")
    st = br.read()
    ev = br.evidence(st) if win is not None else None
    m = resolve_budget(0.5, N)
    plan = method.plan(st.k4, st.v4, st.pos, ev, m)
    new = br.compact(plan, st)
    expect_cells = N if name == "full" else m
    assert new.n_cells == expect_cells and br.read().n_cells == expect_cells
    # the newest token is kept as it is in every layer and head
    assert np.array_equal(new.k4[:, :, -1], st.k4[:, :, -1]) and new.pos[-1] == N - 1
    br.disable_evidence()
    got = ctx.decode(toks[N:], positions=[N])
    expect = ref.decode_with_cache(w, new.k4.astype(np.float32), new.v4.astype(np.float32),
                                   plan.cell_positions(), int(toks[N]), N)
    assert np.isfinite(got).all()
    assert rel_err(got, expect) < 2e-3
