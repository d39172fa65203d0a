"""Minimal driver of llama.cpp's low-level C API (through llama-cpp-python's ctypes bindings) for tests.

Feeds token ids and explicit positions straight to ``llama_decode`` and returns logits as NumPy, with no
sampling, no chat formatting and no high-level ``Llama`` state. One sequence (id 0). Set
``OMP_WAIT_POLICY=PASSIVE`` (and ``LLAMA_CPP_LIB_PATH`` for a dev build) before the first import of
``llama_cpp``; ``tests/conftest.py`` sets the former.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_backend_ready = False


def _llama():
    """Import llama_cpp, init the backend once and keep its log output to errors only."""
    global _backend_ready
    import llama_cpp
    from llama_cpp import _logger as llama_logger

    if not _backend_ready:
        llama_logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def try_load_model(path: str | Path) -> bool:
    """True when llama.cpp can load the GGUF at ``path`` (the model is freed again)."""
    lc = _llama()
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    if not model:
        return False
    lc.llama_model_free(model)
    return True


class LlamaRunner:
    """A loaded model plus one context. Use as a context manager or call :meth:`close`.

    ``flash_attn`` True/False forces flash attention on/off (``flash_attn_type``); ``n_ctx`` is the context
    size in cells (llama.cpp pads it to 256); ``n_batch`` bounds one :meth:`decode` call.
    """

    def __init__(self, path: str | Path, *, n_ctx: int = 512, n_batch: int = 512, flash_attn: bool = False,
                 n_threads: int = 1, type_k: int | None = None, type_v: int | None = None):
        lc = self._lc = _llama()
        self.path = Path(path)
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if type_k is not None:
            cp.type_k = type_k
        if type_v is not None:
            cp.type_v = type_v
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self._batch = lc.llama_batch_init(n_batch, 0, 1)

    def decode(self, tokens, positions=None, *, all_logits: bool = True) -> np.ndarray:
        """Decode ``tokens`` int ``[T]`` (T <= n_batch) at ``positions`` int ``[T]`` (default: continuing after
        the cache's highest position) into sequence 0. Returns float32 ``[T, n_vocab]`` logits when
        ``all_logits`` else ``[1, n_vocab]`` for the last token. Raises RuntimeError if llama_decode fails."""
        lc = self._lc
        tokens = [int(t) for t in tokens]
        T = len(tokens)
        if not 0 < T <= self.n_batch:
            raise ValueError(f"need 1..{self.n_batch} tokens, got {T}")
        if positions is None:
            start = lc.llama_memory_seq_pos_max(lc.llama_get_memory(self.ctx), 0) + 1
            positions = range(start, start + T)
        positions = [int(p) for p in positions]
        b = self._batch
        b.n_tokens = T
        for i, (tok, p) in enumerate(zip(tokens, positions)):
            b.token[i] = tok
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (all_logits or i == T - 1) else 0
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        rows = range(T) if all_logits else [T - 1]
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        for r, i in enumerate(rows):
            ptr = lc.llama_get_logits_ith(self.ctx, i)
            out[r] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def clear(self) -> None:
        """Empty the KV cache."""
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self.ctx), True)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` by the model's own tokenizer (``add_special`` adds BOS for Llama-2)."""
        lc = self._lc
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])

    def token_to_piece(self, token: int) -> str:
        """The text of one token (special tokens rendered)."""
        lc = self._lc
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        lc = self._lc
        if getattr(self, "ctx", None):
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass
