"""The stock llama.cpp API through llama-cpp-python's bindings: models, contexts, batches, tokens (part of the C
boundary, :mod:`kvmerge_local.bridge._lib`)."""
from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np

from ...errors import KVMergeError
from . import lib, llama

log = logging.getLogger("kvmerge_local.bridge._lib")

__all__ = ["route_logs", "model_load", "model_free", "model_info", "model_meta", "context_new", "context_free", "n_ctx", "Batch", "decode", "logits_ith", "memory_seq_pos_max", "memory_clear", "memory_seq_add", "memory_seq_rm", "tokenize", "token_piece", "token_is_eog"]

# --- models, contexts, batches (stock API through llama-cpp-python's bindings) --------------------------

_LOG_CB = None


def route_logs() -> None:
    """Send llama.cpp's log lines to this module's logger (debug level; errors at warning)."""
    global _LOG_CB
    ll = llama()
    if _LOG_CB is not None:
        return

    # typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
    @ll.llama_log_callback
    def _cb(level: int, text: bytes, _user: int) -> None:
        msg = text.decode("utf-8", "replace").rstrip()
        if msg:
            log.log(logging.WARNING if level in (3, 4) else logging.DEBUG, "llama.cpp: %s", msg)

    _LOG_CB = _cb
    # LLAMA_API void llama_log_set(ggml_log_callback log_callback, void * user_data);
    ll.llama_log_set(_cb, ctypes.c_void_p(0))


def model_load(path: str, n_gpu_layers: int = 0) -> int:
    """``llama_model_load_from_file``; returns the model pointer or 0 when llama.cpp refuses the file."""
    ll = llama()
    lib()
    route_logs()
    params = ll.llama_model_default_params()
    params.n_gpu_layers = int(n_gpu_layers)
    # LLAMA_API struct llama_model * llama_model_load_from_file(const char * path_model,
    #                                                           struct llama_model_params params);
    m = ll.llama_model_load_from_file(path.encode(), params)
    return int(m or 0)


def model_free(model: int) -> None:
    # LLAMA_API void llama_model_free(struct llama_model * model);
    llama().llama_model_free(ctypes.c_void_p(model))


def model_info(model: int) -> dict[str, Any]:
    """Hyper-parameters the bridge needs, read through the stock getters."""
    ll = llama()
    m = ctypes.c_void_p(model)
    vocab = ll.llama_model_get_vocab(m)
    return {
        "arch": model_meta(model, "general.architecture") or "?",
        "name": model_meta(model, "general.name") or "",
        "n_layer": ll.llama_model_n_layer(m),
        "n_head": ll.llama_model_n_head(m),
        "n_head_kv": ll.llama_model_n_head_kv(m),
        "n_embd": ll.llama_model_n_embd(m),
        "n_ctx_train": ll.llama_model_n_ctx_train(m),
        "n_swa": ll.llama_model_n_swa(m),
        "rope_type": ll.llama_model_rope_type(m),
        "n_vocab": ll.llama_vocab_n_tokens(vocab),
        "bos": ll.llama_vocab_bos(vocab),
        "eos": ll.llama_vocab_eos(vocab),
        "size": ll.llama_model_size(m),
    }


def model_meta(model: int, key: str) -> str | None:
    """A GGUF metadata string of the loaded model, or None."""
    ll = llama()
    buf = ctypes.create_string_buffer(4096)
    # LLAMA_API int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key,
    #                                            char * buf, size_t buf_size);
    n = ll.llama_model_meta_val_str(ctypes.c_void_p(model), key.encode(), buf, ctypes.sizeof(buf))
    if n >= ctypes.sizeof(buf):  # a long value (chat templates run to 10k characters): read it whole
        buf = ctypes.create_string_buffer(n + 1)
        n = ll.llama_model_meta_val_str(ctypes.c_void_p(model), key.encode(), buf, ctypes.sizeof(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def context_new(model: int, *, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int, flash_attn: bool,
                type_k: int, type_v: int, offload_kqv: bool = True) -> int:
    """``llama_init_from_model`` for one sequence with a unified cache; 0 when llama.cpp refuses."""
    ll = llama()
    p = ll.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_ubatch, 1
    p.n_threads = p.n_threads_batch = n_threads
    p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
    p.type_k, p.type_v = type_k, type_v
    p.offload_kqv = offload_kqv
    p.kv_unified = True
    p.no_perf = True
    # LLAMA_API struct llama_context * llama_init_from_model(struct llama_model * model,
    #                                                        struct llama_context_params params);
    c = ll.llama_init_from_model(ctypes.c_void_p(model), p)
    return int(c or 0)


def context_free(ctx: int) -> None:
    # LLAMA_API void llama_free(struct llama_context * ctx);
    llama().llama_free(ctypes.c_void_p(ctx))


def n_ctx(ctx: int) -> int:
    # LLAMA_API uint32_t llama_n_ctx(const struct llama_context * ctx);
    return int(llama().llama_n_ctx(ctypes.c_void_p(ctx)))


class Batch:
    """A reusable ``llama_batch`` for one sequence, filled from NumPy (token ids, positions, output flags)."""

    def __init__(self, n_max: int) -> None:
        ll = llama()
        # LLAMA_API struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
        self.batch = ll.llama_batch_init(n_max, 0, 1)
        self.n_max = n_max
        self.token = np.ctypeslib.as_array(self.batch.token, shape=(n_max,))
        self.pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_max,))
        self.n_seq_id = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_max,))
        self.logits = np.ctypeslib.as_array(self.batch.logits, shape=(n_max,))
        for i in range(n_max):
            self.batch.seq_id[i][0] = 0
        self.n_seq_id[:] = 1

    def fill(self, tokens: np.ndarray, positions: np.ndarray, output: np.ndarray) -> None:
        n = len(tokens)
        if n > self.n_max:
            raise ValueError(f"batch of {n} tokens exceeds its capacity {self.n_max}")
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.logits[:n] = output
        self.batch.n_tokens = n

    def free(self) -> None:
        if self.batch is not None:
            # LLAMA_API void llama_batch_free(struct llama_batch batch);
            llama().llama_batch_free(self.batch)
            self.batch = None


def decode(ctx: int, batch: Batch) -> int:
    """``llama_decode``: 0 on success (1: no KV slot, 2: aborted, < 0: error)."""
    # LLAMA_API int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
    return int(llama().llama_decode(ctypes.c_void_p(ctx), batch.batch))


def logits_ith(ctx: int, i: int, n_vocab: int) -> np.ndarray:
    """A copy of the logits of output ``i`` (-1: the last), ``float32[n_vocab]``."""
    # LLAMA_API float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
    p = llama().llama_get_logits_ith(ctypes.c_void_p(ctx), i)
    if not p:
        raise KVMergeError(f"no logits for output {i}")
    return np.ctypeslib.as_array(p, shape=(n_vocab,)).copy()


def memory_seq_pos_max(ctx: int, seq_id: int) -> int:
    ll = llama()
    # LLAMA_API llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
    return int(ll.llama_memory_seq_pos_max(ll.llama_get_memory(ctypes.c_void_p(ctx)), seq_id))


def memory_clear(ctx: int) -> None:
    ll = llama()
    # LLAMA_API void llama_memory_clear(llama_memory_t mem, bool data);
    ll.llama_memory_clear(ll.llama_get_memory(ctypes.c_void_p(ctx)), True)


def memory_seq_add(ctx: int, seq_id: int, p0: int, p1: int, delta: int) -> None:
    ll = llama()
    # LLAMA_API void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0,
    #                                     llama_pos p1, llama_pos delta);
    ll.llama_memory_seq_add(ll.llama_get_memory(ctypes.c_void_p(ctx)), seq_id, p0, p1, delta)


def memory_seq_rm(ctx: int, seq_id: int, p0: int, p1: int) -> bool:
    """Remove the cells of ``seq_id`` with positions in ``[p0, p1)`` (``p1 < 0``: to the end)."""
    ll = llama()
    # LLAMA_API bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
    return bool(ll.llama_memory_seq_rm(ll.llama_get_memory(ctypes.c_void_p(ctx)), seq_id, p0, p1))


def tokenize(model: int, text: str, add_special: bool, parse_special: bool = False) -> np.ndarray:
    """Token ids of ``text`` (``int32[n]``)."""
    ll = llama()
    vocab = ll.llama_model_get_vocab(ctypes.c_void_p(model))
    raw = text.encode("utf-8")
    cap = len(raw) + 16
    buf = (ll.llama_token * cap)()
    # LLAMA_API int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
    #                                  llama_token * tokens, int32_t n_tokens_max, bool add_special,
    #                                  bool parse_special);
    n = ll.llama_tokenize(vocab, raw, len(raw), buf, cap, add_special, parse_special)
    if n < 0:
        cap = -n
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(vocab, raw, len(raw), buf, cap, add_special, parse_special)
    return np.frombuffer(buf, dtype=np.int32, count=n).copy()


def token_piece(model: int, token: int) -> bytes:
    """The bytes of one token (special tokens rendered)."""
    ll = llama()
    vocab = ll.llama_model_get_vocab(ctypes.c_void_p(model))
    buf = ctypes.create_string_buffer(256)
    # LLAMA_API int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
    #                                        int32_t length, int32_t lstrip, bool special);
    n = ll.llama_token_to_piece(vocab, token, buf, 256, 0, True)
    return buf.raw[:max(n, 0)]


def token_is_eog(model: int, token: int) -> bool:
    ll = llama()
    # LLAMA_API bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
    return bool(ll.llama_vocab_is_eog(ll.llama_model_get_vocab(ctypes.c_void_p(model)), token))
