"""NumPy reference planners: every registered method re-planned with the slow kernels of
:mod:`kvmerge_local.kernels.reference` (parity tests compare them with the Numba path)."""
from __future__ import annotations

import logging

import numpy as np

from ..kernels import reference as R
from ..plan import Plan
from .base import Method, check_inputs, identity_plan, plan_from_indices, protected_counts
from .cam import CaM
from .full import Full
from .h2o import H2O
from .kvzip import KVzip
from .kvmerger import KVMerger
from .kvmerger_budget import KVMergerBudget
from .skip_layers import SkipLayers
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

log = logging.getLogger(__name__)


def reference_select(method: Method, keys, positions, evidence, m: int) -> np.ndarray:
    """Kept cells int32[L, H, m] of a selection method, computed with the NumPy reference kernels."""
    L, H, N, _ = keys.shape
    if isinstance(method, StreamingLLM):
        s, r = protected_counts(method.n_sink, max(1, m - method.n_sink), m)
        return R.select_topk(np.zeros((L, H, N), np.float32), s, r, m)
    if isinstance(method, (H2O, KVzip)):
        s, r = protected_counts(method.n_sink, method.recent(m), m)
        return R.select_topk(evidence, s, r, m)
    if isinstance(method, SnapKV):
        s, r = protected_counts(method.n_sink, method.window, m)
        return R.select_topk(R.pool1d(evidence, N - r, method.kernel_size, method.pooling == "max"), s, r, m)
    if isinstance(method, TOVA):
        s, r = protected_counts(method.n_sink, 1, m)
        idx = R.select_topk(evidence.mean(axis=1, keepdims=True, dtype=np.float32), s, r, m)
        return np.repeat(idx, H, axis=1)
    raise ValueError(f"no reference selection for {type(method).__name__}")


def reference_plan(method: Method, keys, values, positions, evidence, m: int) -> Plan:
    """The plan ``method.plan(keys, values, positions, evidence, m)`` should return, the slow way."""
    k, _, pos, ev = check_inputs(keys, values, positions, evidence)
    L, H, N, _ = k.shape
    if isinstance(method, Full) or m >= N:
        return identity_plan(L, H, pos)
    if isinstance(method, CaM):
        keep = reference_select(method.base, k, pos, ev, m)
        return R.cam_plan(keep, ev, method.draws(ev.shape), method.merge_budget, pos)
    skip = method.skipped(L) if isinstance(method, SkipLayers) else np.zeros(L, bool)
    merger = method.base if isinstance(method, SkipLayers) else method
    if isinstance(merger, KVMerger):
        ev = np.zeros((L, H, N), np.float32) if ev is None else ev
        s, r, kt = merger.counts(m)
        prot = R.protected_mask(ev, s, r, kt)
        if isinstance(merger, KVMergerBudget):
            start, end = R.budget_runs(k, prot, ev, m, merger.epsilon, merger.refuse_below_epsilon)
        else:
            start, end = R.threshold_runs(R.adjacent_cosine(k), prot, ev, m, merger.epsilon)
        if skip.any():
            sel = reference_select(SnapKV(window=merger.window), k[skip], pos[skip], ev[skip], m)
            start[skip], end[skip] = sel, sel + 1
        rms = merger.sigma == "rms"
        return R.gaussian_plan(k, ev, pos, start, end, 0.0 if rms else float(merger.sigma), rms, merger.value_scale == "size")
    return plan_from_indices(reference_select(method, k, pos, ev, m), pos, N)
