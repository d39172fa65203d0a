"""``full``: no compression (the reference every method must reproduce when ``m >= N``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..plan import Plan
from .base import Method, identity_plan

log = logging.getLogger(__name__)


@dataclass
class Full(Method):
    """Keep every cell: the plan is always the identity, whatever the budget."""

    name = "full"
    evidence_kind = "none"

    def plan(self, keys, values, positions, evidence, m: int) -> Plan:
        """Identity plan over all N cells (``m`` is ignored)."""
        return Method.plan(self, keys, values, positions, evidence, keys.shape[2])
