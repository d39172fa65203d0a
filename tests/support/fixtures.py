"""Session-scoped pytest fixtures that build tiny GGUF models once per test session.

Loaded through ``pytest_plugins = ["support.fixtures"]`` in ``tests/conftest.py``.

- ``tiny_model_factory(**kwargs) -> Path``: :func:`~kvmerge_local.tiny.model.make_tiny_llama` with
  those keyword arguments, built once per distinct argument set under a session temp dir (``arch="qwen2"`` or
  ``"qwen3"`` builds that architecture, see :mod:`~kvmerge_local.tiny.arch`).
- ``tiny_weights_factory(**kwargs) -> TinyWeights``: the float32 weights of that model (cached; shared between
  tests, so do not modify the arrays in place).
- ``bad_gguf_factory(kind) -> Path``: :func:`~kvmerge_local.tiny.model.make_bad_gguf` per kind.
- ``tiny_llama``: path of the default model (2 layers, 4 query heads, 2 KV heads, head_dim 64, Llama-2 vocab);
  ``tiny_llama_small``: the same with the 4096-token ``llama2-small`` vocab (about 10 MB instead of 39 MB).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

import pytest

from kvmerge_local.tiny.model import TinyWeights, load_weights, make_bad_gguf, make_tiny_llama

logger = logging.getLogger(__name__)


def _key(kwargs: dict[str, Any]) -> tuple:
    return tuple(sorted(kwargs.items()))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``(**make_tiny_llama_kwargs) -> Path`` with a per-session cache keyed by the arguments."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple, Path] = {}

    def make(**kwargs: Any) -> Path:
        key = _key(kwargs)
        if key not in cache:
            name = "tiny-" + hashlib.sha1(repr(key).encode()).hexdigest()[:12] + ".gguf"
            cache[key] = make_tiny_llama(root / name, **kwargs)
            logger.info("built tiny model %s for %s", cache[key].name, kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_weights_factory(tiny_model_factory: Callable[..., Path]) -> Callable[..., TinyWeights]:
    """Factory ``(**make_tiny_llama_kwargs) -> TinyWeights`` (read back from the built file, cached)."""
    cache: dict[tuple, TinyWeights] = {}

    def load(**kwargs: Any) -> TinyWeights:
        key = _key(kwargs)
        if key not in cache:
            cache[key] = load_weights(tiny_model_factory(**kwargs))
        return cache[key]

    return load


@pytest.fixture(scope="session")
def bad_gguf_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory ``(kind) -> Path`` for the refused files of :func:`make_bad_gguf` (cached per kind)."""
    root = tmp_path_factory.mktemp("bad_ggufs")
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_bad_gguf(root / f"bad-{kind}.gguf", kind)  # type: ignore[arg-type]
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    """The default tiny model (GQA 4/2, head_dim 64, 2 layers, full Llama-2 vocab)."""
    return tiny_model_factory()


@pytest.fixture(scope="session")
def tiny_llama_small(tiny_model_factory: Callable[..., Path]) -> Path:
    """The default tiny model with the 4096-token ``llama2-small`` vocab."""
    return tiny_model_factory(vocab="llama2-small")
