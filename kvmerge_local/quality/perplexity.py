"""Perplexity of held-out natural text with a compressed prefix: compress the prefix, score the suffix.

Text file: JSONL lines ``{"id", "text"}`` (``scripts/make_tasks.py`` writes ``benchmarks/quality/tasks/ppl.jsonl``
from the held-out part of the machine's text).  For each text and (method, budget): the text is cut at the paragraph
break nearest ``prefix_frac`` of its characters; the prefix is ingested (and compressed to the budget, as a
document is); the suffix's tokens -- tokenized jointly with the prefix by the engine's seam rule, at most
``max_suffix_tokens`` -- are decoded after it with logits for every position.  Token ``i+1``'s negative
log-likelihood comes from the logits at ``i`` (the first suffix token is not scored: ingest keeps no logits).
``ppl = exp(sum NLL / number of scored tokens)`` over all texts.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .harness import BenchError, RunConfig, configs, open_session, read_jsonl

log = logging.getLogger(__name__)


def load_texts(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records ``{"id", "text"}`` of a JSONL file (BenchError on a missing file or a malformed line)."""
    p = Path(path)
    out = []
    for ln, r in read_jsonl(p, "perplexity text file"):
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise BenchError(f"{p}:{ln}: need an object with a non-empty string 'text'")
        out.append({"id": str(r.get("id", f"line{ln}")), "text": r["text"]})
    if not out:
        raise BenchError(f"perplexity text file {p} has no records")
    return out[:limit] if limit else out


def split_text(text: str, prefix_frac: float = 0.75) -> tuple[str, str]:
    """(prefix, suffix) with ``prefix + suffix == text``: cut at the blank line nearest ``prefix_frac`` of the
    characters (or the nearest space); the prefix has no trailing whitespace (ingest would strip it)."""
    target = int(len(text) * prefix_frac)
    cuts = [i for i in range(len(text)) if text.startswith("\n\n", i)] or \
           [i for i, c in enumerate(text) if c == " "]
    cut = min(cuts, key=lambda i: abs(i - target)) if cuts else target
    prefix = text[:cut].rstrip()
    if not prefix:
        raise BenchError("text too short to split into a prefix and a suffix")
    return prefix, text[len(prefix):]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float64[n]: -log softmax(logits[i])[targets[i]]; logits float32[n, n_vocab], targets int[n]."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return lse - z[np.arange(len(targets)), targets]


def score_suffix(session, prefix: str, suffix: str, max_suffix_tokens: int = 256) -> tuple[float, int]:
    """(sum NLL, tokens scored) of ``suffix`` after ``prefix`` was ingested into ``session`` (compressed to
    its budget).  The decoded suffix cells are removed afterwards."""
    from ..engine.cache import TAIL_CHARS  # noqa: PLC0415
    from ..engine.chat import continue_tokens  # noqa: PLC0415

    session.ingest(prefix)
    model, ctx = session.model, session.ctx
    toks = continue_tokens(model, prefix[-TAIL_CHARS:], int(model.tokenize(prefix, add_bos=True)[-1]), suffix)
    free = ctx.n_ctx - session.stats.cells_in_use
    toks = toks[: min(max_suffix_tokens, free)]
    if len(toks) < 2:
        raise BenchError(f"no room to score the suffix (n_ctx {ctx.n_ctx}, {ctx.n_ctx - free} cells used)")
    p0 = ctx.n_past
    nll, step = [], max(1, int(ctx.n_batch))
    try:
        for i in range(0, len(toks), step):
            part = toks[i:i + step]
            lg = ctx.decode(part, logits="all")
            nxt = toks[i + 1:i + 1 + len(part)]
            nll.append(token_nll(lg[: len(nxt)], nxt))
    finally:
        session.bridge.remove_from(p0)
    v = np.concatenate(nll)
    return float(v.sum()), int(len(v))


def run(texts: list[dict], methods: list[str], budgets: list[float], cfg: RunConfig, *, prefix_frac: float = 0.75,
        max_suffix_tokens: int = 256, progress: Callable[[int], None] | None = None) -> list[dict]:
    """One row per (method, budget): ``{"method", "budget", "ppl", "nll", "tokens", "n_texts"}``."""
    splits = [split_text(t["text"], prefix_frac) for t in texts]
    rows = []
    for method, budget in configs(methods, budgets):
        tot, cnt = 0.0, 0
        with open_session(cfg, method, budget) as s:
            for prefix, suffix in splits:
                a, b = score_suffix(s, prefix, suffix, max_suffix_tokens)
                tot, cnt = tot + a, cnt + b
                if progress is not None:
                    progress(1)
        rows.append({"method": method, "budget": budget, "ppl": round(math.exp(tot / cnt), 4),
                     "nll": round(tot / cnt, 5), "tokens": cnt, "n_texts": len(texts)})
        log.info("perplexity %s @ %.2f: %.3f (%d tokens)", method, budget, rows[-1]["ppl"], cnt)
    return rows
