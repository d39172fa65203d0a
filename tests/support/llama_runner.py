"""Minimal driver of llama.cpp for tests, on the bridge's own objects (:class:`LlamaModel`, :class:`LlamaContext`,
:class:`KVBridge`): token ids and explicit positions go straight to ``llama_decode`` and logits come back as
NumPy, with no sampling, no chat formatting and no session.  One sequence (id 0).  Set
``OMP_WAIT_POLICY=PASSIVE`` (and ``LLAMA_CPP_LIB_PATH`` for a dev build) before the first call;
``tests/conftest.py`` sets the former.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kvmerge_local.bridge import KVBridge, LlamaContext, LlamaModel, parse_state
from kvmerge_local.bridge.context import llama_can_load

logger = logging.getLogger(__name__)


def try_load_model(path: str | Path) -> bool:
    """True when llama.cpp itself can load the GGUF at ``path`` (the model is freed again)."""
    return llama_can_load(path)


class LlamaRunner:
    """A loaded model plus one context. Use as a context manager or call :meth:`close`.

    ``flash_attn`` True/False forces flash attention on/off; ``n_ctx`` is the context size in cells (llama.cpp
    pads it to 256); ``n_batch`` bounds one :meth:`decode` call; ``kv_type``: the K/V cache type by name.
    """

    def __init__(self, path: str | Path, *, n_ctx: int = 512, n_batch: int = 512, flash_attn: bool = False,
                 n_threads: int = 1, kv_type: str = "f16"):
        self.path = Path(path)
        self.model = LlamaModel(self.path)
        try:
            self.ctx = LlamaContext(self.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
                                    flash_attn=flash_attn, kv_type=kv_type)
        except BaseException:
            self.model.close()
            raise
        self.n_vocab = self.model.n_vocab
        self.n_batch = n_batch

    def decode(self, tokens, positions=None, *, all_logits: bool = True) -> np.ndarray:
        """Decode ``tokens`` int ``[T]`` (T <= n_batch) at ``positions`` int ``[T]`` (default: continuing after
        the cache's highest position) into sequence 0. Returns float32 ``[T, n_vocab]`` logits when
        ``all_logits`` else ``[1, n_vocab]`` for the last token. Raises KVMergeError if llama_decode fails."""
        tok = np.asarray([int(t) for t in tokens], np.int32)
        if not 0 < len(tok) <= self.n_batch:
            raise ValueError(f"need 1..{self.n_batch} tokens, got {len(tok)}")
        pos = None if positions is None else np.asarray([int(p) for p in positions], np.int32)
        out = self.ctx.decode(tok, pos, logits="all" if all_logits else "last")
        return out if all_logits else out[None, :]

    def clear(self) -> None:
        """Empty the KV cache."""
        self.ctx.clear()

    def state(self) -> bytes:
        """Sequence 0's state blob (``llama_state_seq_get_data``)."""
        return KVBridge(self.ctx).read().blob.tobytes()

    def set_state(self, blob: bytes) -> None:
        """Load a state blob into sequence 0 (KVMergeError when llama.cpp refuses it)."""
        st = parse_state(np.frombuffer(blob, np.uint8).copy(), self.model.geom)
        KVBridge(self.ctx).write(st)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` by the model's own tokenizer (``add_special`` adds BOS for Llama-2)."""
        return [int(t) for t in self.model.tokenize(text, add_bos=add_special, special=parse_special)]

    def token_to_piece(self, token: int) -> str:
        """The text of one token (special tokens rendered)."""
        return self.model.piece(int(token)).decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if getattr(self, "ctx", None) is not None:
            self.ctx.close()
        if getattr(self, "model", None) is not None:
            self.model.close()

    def __enter__(self) -> LlamaRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
