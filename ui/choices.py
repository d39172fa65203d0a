"""What the pickers offer (models, methods, KV types, context sizes) and the settings one ingestion uses."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kvmerge_local.budget import Budget
from kvmerge_local.defaults import DEFAULT_MEMORY, DEFAULT_METHOD
from kvmerge_local.memory import KVStorage

EMBEDDED = "embedded"
"""Model picker value for the embedded default model (``Session.open(model=None)``)."""

N_CTX_CHOICES = (1024, 2048, 4096, 8192, 16384, 32768)
AUTO = "auto"
"""KV type picker value for a memory budget: the budget slider is then the share of an f16 full cache's memory,
met by quantizing first and evicting the rest (``Session.open(memory=...)``)."""
KV_TYPE_ORDER = (AUTO, "f16", "q8_0", "q8_0/q4_0", "q4_0", "bf16", "f32")
KV_TYPE_NOTES = {
    AUTO: "auto: quantize, then evict (default)",
    "f16": "f16 (exact)",
    "q8_0/q4_0": "q8_0 K / q4_0 V (0.41 of the memory)",
    "q8_0": "q8_0 (half the memory)",
    "q4_0": "q4_0 (a quarter of the memory)",
    "bf16": "bf16",
    "f32": "f32 (twice f16)",
}


@dataclass(frozen=True)
class Settings:
    """The choices one ingestion is made with; a saved cache is only reused for the same ones."""

    model: str | None = None
    method: str = DEFAULT_METHOD
    budget: float = DEFAULT_MEMORY
    kv_type: str = AUTO
    n_ctx: int = 2048

    def __post_init__(self) -> None:
        Budget.parse(self.budget)  # the UI's edge: an out-of-range budget is refused with the user's message
        if self.kv_type != AUTO:
            KVStorage.parse(self.kv_type)

    @classmethod
    def from_ui(cls, model: str | None, method: str, budget: float, kv_type: str, n_ctx: int | str) -> "Settings":
        """Settings from picker values (the model picker's :data:`EMBEDDED` means the embedded default)."""
        return cls(model=None if model in (None, "", EMBEDDED) else str(model), method=str(method),
                   budget=float(budget), kv_type=str(kv_type), n_ctx=int(n_ctx))

    def open_kwargs(self) -> dict:
        """Keyword arguments for ``Session.open`` / ``Session.load`` (besides the model)."""
        if self.kv_type == AUTO:
            return {"n_ctx": self.n_ctx, "method": self.method, "memory": self.budget}
        return {"n_ctx": self.n_ctx, "kv_type": self.kv_type, "method": self.method, "budget": self.budget}

    def fingerprint(self) -> str:
        """Short stable hash of the settings (part of a saved cache's key)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    def describe(self) -> str:
        """One line for people: ``kvzip @ 25% memory · auto · n_ctx 2048 · <model>`` (``@ 50% · f16`` with a
        cache type: a share of the cells)."""
        unit = " memory" if self.kv_type == AUTO else ""
        return (f"{self.method} @ {self.budget:.0%}{unit} · {self.kv_type} · n_ctx {self.n_ctx} · "
                f"{model_label(self.model)}")


def model_label(model: str | None) -> str:
    """How a model value is shown: the embedded default, or the file or entry name."""
    if model in (None, "", EMBEDDED):
        return "embedded default"
    return Path(model).name if ("/" in model or model.endswith(".gguf")) else model


def installed_models() -> list[str]:
    """models.txt entries whose files are present on disk (names ``Session.open`` accepts)."""
    from kvmerge_local import models
    from kvmerge_local.errors import ModelError

    try:
        registry = models.load_registry()
    except ModelError:  # no models.txt: only the embedded default and explicit paths
        return []
    return [name for name, entry in registry.items() if entry.local_path.is_file()]


def embedded_model() -> str | None:
    """File name of the embedded default model, or None when this install has none."""
    from kvmerge_local import models
    from kvmerge_local.errors import ModelError

    try:
        return models.default_model().name
    except ModelError:
        return None


def document_model() -> str:
    """The models.txt name of the real document model (SmolLM2-135M-Instruct, pulled by ``make setup``): the
    model the picker preselects when ``--model`` is not given."""
    from kvmerge_local.models import DOCUMENT_MODEL

    return DOCUMENT_MODEL


def document_model_missing() -> str | None:
    """Why the document model cannot be used (not downloaded, or not matching models.txt), or None."""
    from kvmerge_local import models
    from kvmerge_local.errors import ModelError

    try:
        models.default_document_model()
    except ModelError as exc:
        return str(exc)
    return None


def default_model_choice(preferred: str | None = None) -> str:
    """The picker's initial value: ``preferred`` (``--model``), else the document model."""
    return preferred or document_model()


def model_choices(preferred: str | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs: the document model first (offered even when it is not downloaded: choosing it
    then says how to get it), the embedded default (when present; the tiny benchmark model), the other
    installed models.txt entries, and ``preferred`` (``--model``)."""
    doc = document_model()
    installed = installed_models()
    note = "document model" if doc in installed else "document model, not downloaded: run `make setup`"
    out = [(f"{model_label(doc)} ({note})", doc)]
    embedded = embedded_model()
    if embedded:
        out.append((f"Embedded tiny model ({embedded}, benchmark tasks only)", EMBEDDED))
    for name in installed:
        if name != doc:
            out.append((model_label(name), name))
    if preferred and preferred not in {v for _, v in out}:
        out.append((model_label(preferred), preferred))
    return out


def method_choices() -> list[tuple[str, str]]:
    """(label, value) for every method of the registry (the default first, then the KVMerger variants, then the rest)."""
    from kvmerge_local.methods import REGISTRY

    names = sorted(REGISTRY, key=lambda n: (n != DEFAULT_METHOD, not n.startswith("kvmerger"), n))
    return [(n, n) for n in names]


def kv_type_choices() -> list[tuple[str, str]]:
    """(label, value) for :data:`AUTO` and the KV cache types the bridge supports (K/V pairs included), most
    useful first."""
    from kvmerge_local.bridge.context import KV_TYPES

    names = [t for t in KV_TYPE_ORDER if t == AUTO or all(x in KV_TYPES for x in t.split("/"))]
    names += [t for t in KV_TYPES if t not in KV_TYPE_ORDER]
    return [(KV_TYPE_NOTES.get(t, t), t) for t in names]
