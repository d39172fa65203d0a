"""kvmerge-local: long-document chat on local quantized Llama models by merging the KV cache."""
__version__ = "0.1.0"

# Lazy re-exports (PEP 562): nothing heavy (NumPy kernels, llama.cpp) loads at package import.
_LAZY = {
    "Session": ("kvmerge_local.engine.session", "Session"),
    "Stats": ("kvmerge_local.engine.stats", "Stats"),
    "IngestProgress": ("kvmerge_local.engine.stats", "IngestProgress"),
    "DocumentCache": ("kvmerge_local.engine.cache", "DocumentCache"),
    "Budget": ("kvmerge_local.budget", "Budget"),
}


def __getattr__(name):
    if name == "compress":
        from .compress import compress

        globals()["compress"] = compress
        return compress
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        obj = getattr(importlib.import_module(mod), attr)
        globals()[name] = obj
        return obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"compress", *_LAZY})
