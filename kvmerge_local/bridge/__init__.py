"""The KV bridge between llama.cpp (patched) and NumPy.  Importing this package loads nothing native;
the library loads on first use."""
from .context import KV_TYPES, LlamaContext, LlamaModel
from .kv import KVBridge, apply_plan_to_state, copy_sources
from .rope import RopeParams
from .state import KVGeometry, KVState, float_views, new_state, parse_state

__all__ = ["KV_TYPES", "KVBridge", "KVGeometry", "KVState", "LlamaContext", "LlamaModel", "RopeParams",
           "apply_plan_to_state", "copy_sources", "float_views", "new_state", "parse_state"]
