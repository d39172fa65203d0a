"""kvmerge-local: long-document chat on local quantized Llama models by merging the KV cache."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: ``kvmerge_local.compress`` without importing Numba kernels at package import.
    if name == "compress":
        from .compress import compress

        globals()["compress"] = compress
        return compress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
