"""Method base classes, input validation, budget semantics and plan builders shared by all methods.

Interface (what the engine calls)::

    m = resolve_budget(budget, N)
    plan = method.plan(keys, values, positions, evidence, m)

- ``keys``/``values``: ``[n_layer, n_kv_head, N, head_dim]`` float16 or float32, any strides (views into
  llama.cpp's state; V may be transposed).
- ``positions``: int ``[n_layer, n_kv_head, N]`` or ``[N]`` (broadcast), strictly increasing along N, or
  None for ``arange(N)``.
- ``evidence``: float32 ``[n_layer, n_kv_head, N]`` or None; what it must hold is declared by the method's
  ``evidence_kind`` ("none", "window" = attention column sums over the last ``window`` queries, "all" =
  over all prompt queries, "last" = the last query only, "reconstruct" = KVzip's max attention of queries
  replaying the document, see :mod:`kvmerge_local.engine.replay`).
- Every (layer, head) gets exactly ``m`` slots sorted by position, the newest cell always kept; the plan is
  the identity when ``m >= N``.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers

import numpy as np

from ..budget import Budget
from ..kernels.f16 import as_kernel_array
from ..kernels.select import select_topk
from ..plan import Plan

log = logging.getLogger(__name__)

EVIDENCE_KINDS = ("none", "window", "all", "last", "reconstruct")


def resolve_budget(budget: float | int, n: int) -> int:
    """Cells to keep: a fraction ``0 < budget <= 1`` of ``n`` (rounded, at least 1) or an int count ``>= 1``.

    An int count larger than ``n`` returns ``n`` (nothing to compress).  Raises ValueError otherwise
    (:class:`kvmerge_local.budget.Budget`, which callers at the edge parse once, holds the rules).
    """
    return Budget(budget).cells(n)


def protected_counts(n_sink: int, n_recent: int, m: int) -> tuple[int, int]:
    """(sinks, recent) actually protected with ``m`` slots: the newest cell always, recent before sinks."""
    r = max(1, min(int(n_recent), m))
    return min(int(n_sink), m - r), r


def check_inputs(keys, values, positions, evidence):
    """Validate shapes/dtypes; returns (keys, values, positions int32[L, H, N], evidence float32 or None).

    keys/values come back as kernel arrays (float16 viewed as uint16, float32 unchanged; no copies).
    """
    for name, a in (("keys", keys), ("values", values)):
        if not isinstance(a, np.ndarray) or a.ndim != 4:
            raise ValueError(f"{name} must be a 4-D numpy array [n_layer, n_kv_head, N, head_dim]")
        if a.dtype not in (np.float16, np.float32):
            raise ValueError(f"{name} must be float16 or float32, got {a.dtype}")
    L, H, N, _ = keys.shape
    if values.shape[:3] != (L, H, N):
        raise ValueError(f"values shape {values.shape} does not match keys {keys.shape}")
    if N < 1:
        raise ValueError("empty cache")
    if positions is None:
        positions = np.arange(N, dtype=np.int32)
    positions = np.asarray(positions)
    if not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"positions must be integers, got {positions.dtype}")
    if positions.shape not in ((N,), (L, H, N)):
        raise ValueError(f"positions shape {positions.shape} must be ({N},) or {(L, H, N)}")
    positions = positions.astype(np.int32, copy=False)
    if N > 1 and np.any(np.diff(positions, axis=-1) <= 0):
        raise ValueError("positions must be strictly increasing along the cell axis")
    positions = np.broadcast_to(positions, (L, H, N))
    if evidence is not None:
        evidence = np.asarray(evidence)
        if evidence.shape != (L, H, N):
            raise ValueError(f"evidence shape {evidence.shape} != {(L, H, N)}")
        if not np.issubdtype(evidence.dtype, np.floating):
            raise ValueError(f"evidence must be floating point, got {evidence.dtype}")
        evidence = evidence.astype(np.float32, copy=False)
        if np.isnan(evidence).any():
            raise ValueError("evidence contains NaN")
    return as_kernel_array(keys, "keys"), as_kernel_array(values, "values"), positions, evidence


def identity_plan(n_layer: int, n_kv_head: int, positions: np.ndarray) -> Plan:
    """The plan that keeps every cell unchanged; positions int32[L, H, N]."""
    n = positions.shape[-1]
    idx = np.broadcast_to(np.arange(n, dtype=np.int32), (n_layer, n_kv_head, n))
    return plan_from_indices(idx, positions, n)


def plan_from_indices(idx: np.ndarray, positions: np.ndarray, n_in: int) -> Plan:
    """Selection plan: slot j of (l, h) copies cell ``idx[l, h, j]`` (int[L, H, m], ascending)."""
    L, H, m = idx.shape
    nnz = L * H * m
    return Plan(
        n_in=int(n_in),
        offsets=(np.arange(L * H, dtype=np.int64)[:, None] * m + np.arange(m + 1)).reshape(L, H, m + 1),
        src=np.ascontiguousarray(idx, dtype=np.int32).reshape(-1),
        wk=np.ones(nnz, np.float32),
        wv=np.ones(nnz, np.float32),
        pos=np.take_along_axis(np.broadcast_to(positions, (L, H, positions.shape[-1])), idx.astype(np.intp), axis=2).astype(np.int32),
    )


def _check_nonneg_int(obj, *names: str, minimum: int = 0) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
            raise ValueError(f"{type(obj).__name__}.{name} must be an int >= {minimum}, got {v!r}")


class Method:
    """Base of every method: validation, the identity shortcut and evidence checks around ``_plan``."""

    name = "method"
    evidence_kind = "none"
    window = 0
    needs_evidence = True  # False: the method falls back to zero evidence when given None

    def plan(self, keys, values, positions, evidence, m: int) -> Plan:
        """Compaction plan keeping ``m`` cells of every (layer, head); see the module docstring."""
        k, v, pos, ev = check_inputs(keys, values, positions, evidence)
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"m must be an int >= 1, got {m!r}")
        L, H, N, _ = k.shape
        if m >= N:
            return identity_plan(L, H, pos)
        if ev is None and self.evidence_kind != "none" and self.needs_evidence:
            raise ValueError(f"{self.name} needs evidence of kind {self.evidence_kind!r}")
        plan = self._plan(k, v, pos, ev, int(m))
        log.debug("%s: %d -> %d cells, nnz=%d", self.name, N, m, plan.src.shape[0])
        return plan

    def _plan(self, keys, values, positions, evidence, m: int) -> Plan:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must implement _plan")

    def params(self) -> dict:
        """The method's parameters (dataclass fields) by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class Selection(Method):
    """Eviction by score (kvpress "scorer press" style): subclasses give ``scores`` and the protected counts.

    Owns top-k with protected tokens and the plan building: sinks (first ``n_sink``) and recent (last
    ``recent(m)``) are kept, the other ``m - sinks - recent`` slots go to the highest scores.
    """

    def recent(self, m: int) -> int:
        """How many newest cells are protected with budget ``m`` (at least 1)."""
        return 1

    def scores(self, keys, positions, evidence, m: int) -> np.ndarray:
        """float32[L, H or 1, N] scores (1 = same layout for every head of a layer)."""
        L, _, N, _ = keys.shape
        return np.zeros((L, 1, N), np.float32)

    def select(self, keys, values, positions, evidence, m: int) -> np.ndarray:
        """Kept cells int32[L, H, m], ascending (inputs already validated, ``m < N``)."""
        H = keys.shape[1]
        s, r = protected_counts(getattr(self, "n_sink", 0), self.recent(m), m)
        sc = np.ascontiguousarray(self.scores(keys, positions, evidence, m), dtype=np.float32)
        idx = select_topk(sc, s, r, m)
        return idx if idx.shape[1] == H else np.repeat(idx, H, axis=1)

    def _plan(self, keys, values, positions, evidence, m: int) -> Plan:
        return plan_from_indices(self.select(keys, values, positions, evidence, m), positions, keys.shape[2])
