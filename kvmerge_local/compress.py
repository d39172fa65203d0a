"""NumPy-level entry point: compress raw K/V arrays without llama.cpp (as kvpress presses on tensors)."""
from __future__ import annotations

import dataclasses
import logging
import sys
import types

import numpy as np

from .budget import Budget
from .defaults import DEFAULT_METHOD
from .kernels.apply import apply_plan
from .methods import Method, get_method
from .methods.base import check_inputs

log = logging.getLogger(__name__)


def compress(keys: np.ndarray, values: np.ndarray, evidence: np.ndarray | None = None, *,
             method: str | Method = DEFAULT_METHOD, budget: Budget | float | int = 0.5, positions: np.ndarray | None = None,
             **params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compress a KV cache with a registered method.

    keys, values: float16 or float32 ``[n_layer, n_kv_head, N, head_dim]`` (any strides);
    evidence: float32 ``[n_layer, n_kv_head, N]`` of the method's ``evidence_kind`` (KVMerger accepts
    None: zero evidence; the default, KVzip, needs its replay scores, which only a model can give); positions: int ``[n_layer, n_kv_head, N]`` or ``[N]`` (None: ``arange(N)``);
    method: a registry name (see ``kvmerge_local.methods.REGISTRY``; default ``DEFAULT_METHOD``) or a Method
    instance; budget: a fraction in (0, 1] or an int cell count (:class:`~kvmerge_local.budget.Budget`);
    params override the method's parameters.

    Returns new contiguous ``(keys [L, H, m, d], values [L, H, m, d], positions int32[L, H, m])`` in the
    input dtypes.  Raises ValueError on shape, dtype, budget or parameter errors.
    """
    budget = Budget.parse(budget)
    if isinstance(method, Method):
        meth = dataclasses.replace(method, **params) if params else method
    else:
        meth = get_method(str(method), **params)
    check_inputs(keys, values, positions, evidence)
    if evidence is None and meth.evidence_kind == "reconstruct":
        raise ValueError(f"{meth.name} ranks cells by replaying the document on the model (evidence kind "
                         "'reconstruct'): pass evidence= (kvmerge_local.engine.replay.replay_scores), compress "
                         "through a Session, or pick a method that works on K/V alone (e.g. method='kvmerger+budget')")
    L, H, N, _ = keys.shape
    m = budget.cells(N)
    plan = meth.plan(keys, values, positions, evidence, m)
    k_out = np.empty((L, H, plan.m, keys.shape[3]), keys.dtype)
    v_out = np.empty((L, H, plan.m, values.shape[3]), values.dtype)
    apply_plan(keys, k_out, plan, "k")
    apply_plan(values, v_out, plan, "v")
    log.debug("compress %s: %d -> %d cells", getattr(meth, "name", meth), N, plan.m)
    return k_out, v_out, plan.pos


class _CallableModule(types.ModuleType):
    """``kvmerge_local.compress`` may resolve to this module (``import kvmerge_local.compress``):
    calling it calls :func:`compress`."""

    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
