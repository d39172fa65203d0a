"""SkipLayers: a wrapper press that keeps some layers out of a merging method (KVMerger's broad-attention layers).

The KVMerger paper observes that the first layers and the last attend broadly and merges elsewhere; here those
layers select cells with SnapKV (the same evidence and observation window as the base) and every other layer
is planned by ``base`` -- as CaM wraps a selection method.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..plan import Plan
from .base import Method, plan_from_indices
from .kvmerger import KVMerger
from .snapkv import SnapKV

log = logging.getLogger(__name__)


@dataclass
class SkipLayers(Method):
    """Wrapper: SnapKV selection on the broad-attention layers ``layers``, ``base``'s plan on the others.

    ``layers``: negative = from the end (the paper's ``(0, 1, -1)``); entries beyond the model's depth are
    ignored, so one configuration serves models of any depth.  SnapKV uses ``base``'s window and evidence.  Parameters not of this press (``epsilon``,
    ``window``, ...) belong to ``base`` (``get_method`` passes them on)."""

    base: Method = field(default_factory=KVMerger)
    layers: tuple = (0, 1, -1)

    def __post_init__(self):
        if not isinstance(self.base, Method) or isinstance(self.base, SkipLayers):
            raise ValueError(f"SkipLayers.base must be a method other than SkipLayers, got {type(self.base).__name__}")
        try:
            self.layers = tuple(int(x) for x in self.layers)
        except (TypeError, ValueError):
            raise ValueError(f"SkipLayers.layers must be a sequence of ints, got {self.layers!r}") from None
        if self.layers and self.base.evidence_kind == "none":
            raise ValueError("SkipLayers selects with SnapKV, which needs evidence: the base method asks for none")
        self.selector()  # validates the window

    @property
    def name(self) -> str:
        return f"{self.base.name}+skip"

    @property
    def evidence_kind(self) -> str:
        return self.base.evidence_kind

    @property
    def window(self) -> int:
        return self.base.window

    @property
    def needs_evidence(self) -> bool:
        return self.base.needs_evidence

    def selector(self) -> SnapKV:
        """The selection used on the skipped layers."""
        return SnapKV(window=self.base.window)

    def skipped(self, n_layer: int) -> np.ndarray:
        """bool[n_layer]: the layers that select instead of using ``base``."""
        out = np.zeros(n_layer, bool)
        for x in self.layers:
            if -n_layer <= x < n_layer:
                out[x] = True
        return out

    def _plan(self, keys, values, positions, evidence, m: int) -> Plan:
        L, _, N, _ = keys.shape
        ev = np.zeros((L,) + keys.shape[1:3], np.float32) if evidence is None else evidence
        skip = self.skipped(L)
        snap = self.selector()
        parts = []
        for sl, skipped in _layer_runs(skip):
            if skipped:
                idx = snap.select(keys[sl], None, positions[sl], ev[sl], m)
                parts.append(plan_from_indices(idx, positions[sl], N))
            else:
                parts.append(self.base._plan(keys[sl], values[sl], positions[sl], None if evidence is None else ev[sl], m))
        return concat_layers(parts)


def _layer_runs(skip: np.ndarray) -> list[tuple[slice, bool]]:
    """Maximal runs of consecutive layers with the same ``skip`` flag, as (slice, flag) (views, never copies)."""
    out: list[tuple[slice, bool]] = []
    for l, s in enumerate(skip.tolist()):
        if out and out[-1][1] == s:
            out[-1] = (slice(out[-1][0].start, l + 1), s)
        else:
            out.append((slice(l, l + 1), s))
    return out


def concat_layers(parts: list[Plan]) -> Plan:
    """One plan from plans of consecutive layer ranges (same ``n_in``, ``m`` and ``n_kv_head``), in order."""
    if len(parts) == 1:
        return parts[0]
    shift = np.cumsum([0] + [p.src.shape[0] for p in parts[:-1]])
    return Plan(n_in=parts[0].n_in,
                offsets=np.concatenate([p.offsets + s for p, s in zip(parts, shift)]).astype(np.int64, copy=False),
                src=np.concatenate([p.src for p in parts]), wk=np.concatenate([p.wk for p in parts]),
                wv=np.concatenate([p.wv for p in parts]), pos=np.concatenate([p.pos for p in parts]))
