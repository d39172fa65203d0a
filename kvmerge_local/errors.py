"""Exceptions with messages a user can act on."""
from __future__ import annotations


class KVMergeError(RuntimeError):
    """Base class for kvmerge-local runtime errors."""


class PatchMissingError(KVMergeError):
    """The loaded libllama lacks the kvmerge-local patch (or llama-cpp-python is missing)."""


class ModelError(KVMergeError):
    """A model file is missing, corrupt, or of an architecture kvmerge-local cannot compact."""


class UnsupportedCacheError(KVMergeError):
    """A KV cache layout or type the bridge cannot read or write (several streams, unknown type...)."""
