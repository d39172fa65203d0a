"""KVMerger split into small presses (issue 10): the paper's threshold KVMerger, the budget variant and the
SkipLayers wrapper give exactly the plans of the old single 11-field ``KVMerger`` class.

The oracle below is a frozen copy of the old class's ``_plan`` dispatch (mode / skip_layers flags), calling the
same kernels, so the comparison is bit for bit on every machine.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvmerge_local.kernels.cluster import budget_runs, threshold_runs
from kvmerge_local.kernels.merge import csr_offsets, gaussian_runs_fill
from kvmerge_local.kernels.select import protected_mask
from kvmerge_local.kernels.similarity import adjacent_cosine
from kvmerge_local.kernels.strided import flat_view
from kvmerge_local.methods import REGISTRY, KVMerger, SnapKV, get_method
from kvmerge_local.methods.base import check_inputs, identity_plan, protected_counts
from kvmerge_local.plan import Plan

#: every registry name the old KVMerger class served, with the arguments it was built with
OLD_ENTRIES = {
    "kvmerger": {},
    "kvmerger+size": {"value_scale": "size"},
    "kvmerger+budget": {"mode": "budget"},
    "kvmerger+sigma5": {"sigma": 5.0},
    "kvmerger+skip": {"skip_layers": (0, 1, -1)},
    "kvmerger+kvzip": {"mode": "budget", "evidence": "reconstruct", "k_top": 0.8},
}
OLD_DEFAULTS = dict(mode="threshold", epsilon=0.75, refuse_below_epsilon=False, sigma="rms", value_scale="none",
                    k_top=0.1, n_sink=4, n_recent=32, window=32, evidence="window", skip_layers=())


def old_plan(params: dict, keys, values, positions, evidence, m: int) -> Plan:
    """The old ``KVMerger.plan`` (commit 7c38afe), frozen."""
    p = dict(OLD_DEFAULTS, **params)
    keys, _, positions, evidence = check_inputs(keys, values, positions, evidence)
    L, H, N, _ = keys.shape
    if m >= N:
        return identity_plan(L, H, positions)
    ev = np.zeros((L, H, N), np.float32) if evidence is None else np.ascontiguousarray(evidence)
    s, r = protected_counts(p["n_sink"], p["n_recent"], m)
    kt = p["k_top"]
    k = int(kt) if isinstance(kt, int) else int(round(kt * m))
    k = max(0, min(k, m - s - r))
    skip = np.zeros(L, bool)
    for x in p["skip_layers"]:
        if -L <= x < L:
            skip[x] = True
    start = np.empty((L, H, m), np.int32)
    end = np.empty((L, H, m), np.int32)
    for sl in _slices(np.flatnonzero(~skip)):
        prot = protected_mask(ev[sl], s, r, k)
        if p["mode"] == "threshold":
            start[sl], end[sl] = threshold_runs(adjacent_cosine(keys[sl]), prot, ev[sl], m, float(p["epsilon"]))
        else:
            start[sl], end[sl] = budget_runs(keys[sl], prot, ev[sl], m, float(p["epsilon"]), p["refuse_below_epsilon"])
    for sl in _slices(np.flatnonzero(skip)):
        start[sl] = SnapKV(window=p["window"]).select(keys[sl], None, positions[sl], ev[sl], m)
        end[sl] = start[sl] + 1
    offsets = csr_offsets(end - start)
    nnz = int(offsets[-1, -1, -1])
    src, wk, wv = np.empty(nnz, np.int32), np.empty(nnz, np.float32), np.empty(nnz, np.float32)
    pos = np.empty((L, H, m), np.int32)
    rms = p["sigma"] == "rms"
    gaussian_runs_fill(*flat_view(keys, "keys"), ev, positions, start, end, 0.0 if rms else float(p["sigma"]), rms,
                       p["value_scale"] == "size", offsets, src, wk, wv, pos)
    return Plan(n_in=N, offsets=offsets, src=src, wk=wk, wv=wv, pos=pos)


def _slices(layers):
    out = []
    for x in layers.tolist():
        if out and out[-1].stop == x:
            out[-1] = slice(out[-1].start, x + 1)
        else:
            out.append(slice(x, x + 1))
    return out


def _inputs(L, H, N, d, seed, dtype):
    rng = np.random.default_rng(seed)
    k = np.cumsum(rng.standard_normal((L, H, N, d)), axis=2).astype(dtype)
    v = rng.standard_normal((L, H, d, N)).astype(dtype).transpose(0, 1, 3, 2)
    ev = rng.gamma(0.5, 1.0, (L, H, N)).astype(np.float32)
    pos = (np.arange(N) * 3 + 1).astype(np.int32)
    return k, v, ev, pos


def assert_same_plan(a: Plan, b: Plan, what=""):
    assert a.n_in == b.n_in, what
    for f in ("offsets", "src", "wk", "wv", "pos"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (what, f)


def test_every_old_name_is_still_registered():
    assert set(OLD_ENTRIES) <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(OLD_ENTRIES))
@pytest.mark.parametrize("L,H,N,m,dtype,seed", [(4, 2, 160, 80, np.float16, 0), (5, 3, 183, 71, np.float32, 1),
                                                 (3, 1, 120, 40, np.float16, 2), (2, 2, 90, 89, np.float32, 3)])
def test_registry_plans_equal_the_old_class(name, L, H, N, m, dtype, seed):
    k, v, ev, pos = _inputs(L, H, N, 16, seed, dtype)
    assert_same_plan(REGISTRY[name].plan(k, v, pos, ev, m), old_plan(OLD_ENTRIES[name], k, v, pos, ev, m), name)


@pytest.mark.parametrize("name,params,old", [
    ("kvmerger", {"epsilon": 0.3, "k_top": 5, "n_recent": 4}, {"epsilon": 0.3, "k_top": 5, "n_recent": 4}),
    ("kvmerger+budget", {"refuse_below_epsilon": True, "epsilon": 0.9},
     {"mode": "budget", "refuse_below_epsilon": True, "epsilon": 0.9}),
    ("kvmerger+skip", {"layers": (1, 3)}, {"skip_layers": (1, 3)}),  # merged layers 0, 2, 4: three slices
    ("kvmerger+skip", {"layers": (0, 1, 2, 3, 4, 9)}, {"skip_layers": (0, 1, 2, 3, 4, 9)}),  # every layer skipped
    ("kvmerger+skip", {"epsilon": 0.2, "window": 8}, {"skip_layers": (0, 1, -1), "epsilon": 0.2, "window": 8}),
])
def test_overridden_presses_equal_the_old_class(name, params, old):
    k, v, ev, pos = _inputs(5, 2, 130, 16, 4, np.float16)
    assert_same_plan(get_method(name, **params).plan(k, v, pos, ev, 60), old_plan(old, k, v, pos, ev, 60), name)


@pytest.mark.parametrize("name", ["kvmerger", "kvmerger+budget", "kvmerger+skip"])
def test_no_evidence_means_zero_evidence_as_before(name):
    k, v, _, pos = _inputs(3, 2, 100, 16, 5, np.float32)
    zeros = np.zeros(k.shape[:3], np.float32)
    assert_same_plan(REGISTRY[name].plan(k, v, pos, None, 50), old_plan(OLD_ENTRIES[name], k, v, pos, zeros, 50), name)


def test_the_oracle_can_tell_the_variants_apart():
    """The comparison above is not vacuous: the three algorithms give different plans on these inputs."""
    k, v, ev, pos = _inputs(4, 2, 160, 16, 0, np.float16)
    plans = {n: old_plan(OLD_ENTRIES[n], k, v, pos, ev, 80) for n in ("kvmerger", "kvmerger+budget", "kvmerger+skip")}
    keys = list(plans)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            with pytest.raises(AssertionError):
                assert_same_plan(plans[keys[i]], plans[keys[j]])
    assert isinstance(REGISTRY["kvmerger"], KVMerger)
