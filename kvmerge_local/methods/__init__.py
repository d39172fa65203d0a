"""The compression methods and their registry (used by the engine, the UI, the benchmark and the tests).

``REGISTRY`` maps CLI names to configured instances; ``get_method(name, **params)`` returns a copy with
parameters overridden (ValueError on unknown names or parameters); ``describe_methods()`` lists them.
"""
from __future__ import annotations

import dataclasses
import logging

from ..defaults import DEFAULT_METHOD
from .base import EVIDENCE_KINDS, Method, Selection, protected_counts, resolve_budget
from .cam import CaM
from .full import Full
from .h2o import H2O
from .kvmerger import KVMerger
from .kvmerger_budget import KVMergerBudget
from .kvzip import KVzip
from .skip_layers import SkipLayers
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

log = logging.getLogger(__name__)

REGISTRY: dict[str, Method] = {
    "full": Full(),
    "streaming_llm": StreamingLLM(),
    "h2o": H2O(),
    "snapkv": SnapKV(),
    "tova": TOVA(),
    "cam+streaming_llm": CaM(base=StreamingLLM()),
    "cam+h2o": CaM(base=H2O()),
    "cam+snapkv": CaM(base=SnapKV()),
    "kvmerger": KVMerger(),
    "kvmerger+size": KVMerger(value_scale="size"),
    "kvmerger+budget": KVMergerBudget(),
    "kvmerger+sigma5": KVMerger(sigma=5.0),
    "kvmerger+skip": SkipLayers(base=KVMerger(), layers=(0, 1, -1)),
    "kvzip": KVzip(),
    "kvmerger+kvzip": KVMergerBudget(evidence="reconstruct", k_top=0.8),
}
REGISTRY["cam"] = REGISTRY["cam+streaming_llm"]


def get_method(name: str, **params) -> Method:
    """A fresh instance of registry entry ``name`` with ``params`` overridden (validated).

    For wrapper presses (``cam+<base>``, ``kvmerger+skip``), parameters the wrapper does not have are passed to
    its ``base`` method.
    Raises ValueError for an unknown name or parameter, or an invalid value.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    proto = REGISTRY[name]
    own = {f.name for f in dataclasses.fields(proto)}
    mine = {k: v for k, v in params.items() if k in own}
    rest = {k: v for k, v in params.items() if k not in own}
    if rest and isinstance(getattr(proto, "base", None), Method) and "base" not in mine:
        base_fields = {f.name for f in dataclasses.fields(proto.base)}
        unknown = sorted(set(rest) - base_fields)
        if not unknown:
            mine["base"] = dataclasses.replace(proto.base, **rest)
            rest = {}
    if rest:
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(sorted(rest))}; it has: {', '.join(sorted(own))}")
    try:
        return dataclasses.replace(proto, **mine)
    except TypeError as e:
        raise ValueError(str(e)) from None


def describe_methods() -> list[dict]:
    """One dict per registry entry: name, class, evidence kind, window and parameters (for the CLI)."""
    out = []
    for name, meth in REGISTRY.items():
        params = {k: (f"{type(v).__name__}({_short(v)})" if isinstance(v, Method) else v) for k, v in meth.params().items()}
        out.append({"name": name, "class": type(meth).__name__, "evidence_kind": meth.evidence_kind,
                    "window": meth.window, "params": params, "doc": (type(meth).__doc__ or "").strip().splitlines()[0]})
    return out


def _short(m: Method) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in m.params().items())


__all__ = ["DEFAULT_METHOD", "REGISTRY", "get_method", "describe_methods", "resolve_budget", "protected_counts", "EVIDENCE_KINDS",
           "Method", "Selection", "Full", "StreamingLLM", "H2O", "SnapKV", "TOVA", "CaM", "KVMerger", "KVMergerBudget",
           "SkipLayers", "KVzip"]
