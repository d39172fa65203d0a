"""The trainer's data: dense training sequences and their token/answer masks; no torch here.

Corpus, facts, context assembly and the benchmark's task generator live in :mod:`kvmerge_local.quality.tasks`
(re-exported here under their old names, so ``data.generate_tasks`` etc. keep working in ``train.py``); this
module adds what only training needs: :func:`training_text` (many facts, many questions, character spans of
every answer continuation) and :func:`encode` (llama.cpp token ids plus the answer-token mask).
"""
from __future__ import annotations

import numpy as np

from kvmerge_local.quality.tasks import (DEFAULT_MIX, N_VOCAB, TASKS, Assembler, Corpus, Facts, approx_tokens,
                                         dense_facts, generate_tasks, llama_token_counter, load_corpus,
                                         word_pools, word_pools_cached, write_jsonl)

__all__ = ["DEFAULT_MIX", "N_VOCAB", "TASKS", "Assembler", "Corpus", "Facts", "approx_tokens", "dense_facts",
           "encode", "generate_tasks", "llama_token_counter", "load_corpus", "training_text", "word_pools",
           "word_pools_cached", "write_jsonl"]


def training_text(asm: Assembler, rng: np.random.Generator, n_tokens: int, density: float,
                  split: str = "train", mix: tuple[float, ...] = DEFAULT_MIX,
                  supervise_stop: bool = True, hop_verb: str = "contains") -> tuple[str, list[tuple[int, int]]]:
    """One dense training sequence of ~``n_tokens`` tokens: filler with facts of all task types (``density``
    facts per 100 tokens; 0 gives plain text), then every question with its answer continuation.  Returns the
    text and the character spans ``[start, end)`` of the continuations, with ``supervise_stop`` including the
    newline after each (where the answer loss applies)."""
    if density <= 0:
        return asm.context(rng, n_tokens, Facts(), split), []
    f = dense_facts(rng, n_tokens, word_pools_cached(), density, mix, hop_verb)
    qa_tokens = sum(approx_tokens(q.question + q.continuation) for q in f.qas)
    ctx = asm.context(rng, max(64, n_tokens - qa_tokens), f, split)
    parts, spans, n = [ctx], [], len(ctx)
    stop = int(supervise_stop)  # a continuation is followed by a newline (the next question's, or a final
    for q in f.qas:               # one): in the span, the model learns to stop where generation ends
        parts.append(q.question)
        n += len(q.question)
        parts.append(q.continuation)
        spans.append((n, n + len(q.continuation) + stop))
        n += len(q.continuation)
    return "".join(parts) + "\n" * stop, spans


def encode(tok_model, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int64 ``[T]`` of ``text`` with BOS, tokenized as ONE text by llama.cpp (``tok_model``, a
    :class:`~kvmerge_local.bridge.LlamaModel`), and a bool ``[T]`` marking tokens that overlap a character span
    ``[start, end)`` (the text must be ASCII).  Offsets come from the token pieces; SentencePiece's one added
    leading space is subtracted."""
    ids = tok_model.tokenize(text, add_bos=True).astype(np.int64)
    is_ans = np.zeros(len(ids), dtype=bool)
    if spans:
        # characters per piece: byte-fallback pieces of one UTF-8 character (e.g. a lone space is the three
        # bytes of U+2581 here, since id 29871 is outside the vocabulary prefix) count once, on the lead byte
        lens = np.array([0] + [sum(1 for c in tok_model.piece(int(t)) if not 0x80 <= c < 0xC0) for t in ids[1:]],
                        dtype=np.int64)
        end = np.cumsum(lens) - 1
        start = end - lens
        for a, b in spans:
            is_ans |= (end > a) & (start < b) & (lens > 0)
        is_ans[0] = False
    return ids, is_ans
