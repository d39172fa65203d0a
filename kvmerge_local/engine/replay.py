"""KVzip's context-reconstruction scores, measured on the llama.cpp context itself.

:func:`replay_scores` appends, after the cached document, a "repeat the previous context" prompt followed by
the document's own tokens (chunk by chunk), with the patch's attention evidence on for every query; after each
decode call of ``step`` replay tokens it reads the evidence of the cells that were in the cache before the
replay (float32[n_layer, n_head, N]), keeps the running maximum, resets the accumulator, and at the end of a
chunk removes the replay cells with ``llama_memory_seq_rm``, so the cache is exactly what it was.  The score
of a cell is the max over replay calls and over the query heads of its KV head's group.

On any failure the replay cells are removed before the exception propagates (the document cache is never
left with replay tokens in it).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..bridge import KVBridge
from ..errors import KVMergeError

log = logging.getLogger(__name__)

FIRST_PROMPT = "Repeat the previous context exactly."
LATER_PROMPT = "Repeat the part of the previous context exactly, starting with"
CUE_TOKENS = 8


def replay_prompt(model, fmt, instruction: str) -> np.ndarray:
    """int32[n]: ``instruction`` laid out as the chat format ``fmt`` lays out a first question after the
    document (KVzip replays the document as the answer to it), tokenized by ``model``."""
    from .templates import Q1, TemplateFormat  # noqa: PLC0415

    text = fmt.first.replace(Q1, instruction) if isinstance(fmt, TemplateFormat) else fmt.first.format(q=instruction)
    return model.tokenize(text, add_bos=False, special=bool(getattr(fmt, "special", False)))


def replay_scores(bridge: KVBridge, doc_tokens: np.ndarray, first_prompt: np.ndarray, later_prompt: np.ndarray,
                  *, chunk_size: int, step: int) -> np.ndarray:
    """float32[n_layer, n_kv_head, N]: KVzip scores of the N cells now in the cache (blob order).

    ``doc_tokens``: int32[n], the document tokens to replay (those the cells stand for); ``first_prompt`` /
    ``later_prompt``: int32 token ids of the replay instruction laid out as the chat format lays out a
    question after the document (later chunks append the previous chunk's last ``CUE_TOKENS`` tokens).
    ``chunk_size`` is cut down to the room left in the context.
    """
    ctx = bridge.ctx
    g = bridge.geom
    n_head = int(ctx.model.info["n_head"])
    p_end = ctx.n_past
    slots_before = len(bridge.cell_positions())
    room = ctx.n_ctx - slots_before - max(len(first_prompt), len(later_prompt) + CUE_TOKENS) - 1
    if room < 16:
        raise KVMergeError(f"no room to replay the document for KVzip scoring ({slots_before} cells in a "
                           f"context of {ctx.n_ctx}); use a larger n_ctx or another method")
    chunk = max(16, min(int(chunk_size), room))
    best = np.zeros((g.n_layer, n_head, slots_before), np.float32)
    doc = np.asarray(doc_tokens, np.int32)
    t0, n_fed = time.perf_counter(), 0
    bridge.enable_evidence(0)
    try:
        for c0 in range(0, len(doc), chunk):
            part = doc[c0:c0 + chunk]
            head = first_prompt if c0 == 0 else np.concatenate([later_prompt, doc[max(0, c0 - CUE_TOKENS):c0]])
            seq = np.concatenate([np.asarray(head, np.int32), part])
            try:
                for s0 in range(0, len(seq), step):
                    bridge.reset_evidence()
                    ctx.decode(seq[s0:s0 + step], logits="none")
                    np.maximum(best, bridge.evidence(per_kv_head=False, below=p_end), out=best)
                    n_fed += len(seq[s0:s0 + step])
            finally:
                bridge.remove_from(p_end)
    finally:
        bridge.reset_evidence()
        bridge.disable_evidence()
    if ctx.n_past != p_end:
        raise KVMergeError(f"replay cells were not removed (next position {ctx.n_past}, expected {p_end})")
    log.info("KVzip replay: %d tokens in chunks of %d, step %d, %.2fs", n_fed, chunk, step, time.perf_counter() - t0)
    return best.reshape(g.n_layer, g.n_kv_head, n_head // g.n_kv_head, slots_before).max(axis=2)
