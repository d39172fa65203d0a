"""The real-model suite runner: compress each document once per (method, budget), ask all its questions.

For one document (a :mod:`.ruler` record) and one session:

1. the document is ingested in full (no compression; the session must fit it) while the patch accumulates
   attention over every prefill query (H2O's evidence, read at the end of the prefill);
2. the last ``window`` document tokens are decoded again with evidence on (SnapKV's observation window,
   the paper's definition: the queries just before compression), then the last token (TOVA's);
3. KVzip's replay scores are measured once (:func:`~kvmerge_local.engine.replay.replay_scores`);
4. the full cache is kept (a state blob), and for every (method, budget): the blob is written back, the
   session compacts it with the method and the evidence of its kind -- the same ``compact`` the engine's
   ingest uses -- and every question is asked on that one compressed cache (``reset_chat`` between
   questions), greedy, up to a newline or ``max_new_tokens``; then the gold answer is scored teacher-forced
   (:func:`answer_logprob`: its log-likelihood per token and how many of its tokens are the argmax), a
   measure every question contributes to, not only those the full cache answers.

Sharing steps 1-3 across configurations is what makes a real-model suite affordable on 2 cores: the prefill
and the replay are paid once per document, not once per configuration.  Compaction and decoding are real.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from ..budget import Budget
from ..methods import Method
from .harness import BenchError
from .perplexity import token_nll
from .ruler import score_all

log = logging.getLogger(__name__)

SNAP_WINDOW = 32


@dataclasses.dataclass
class SuiteConfig:
    """``prompt``: "chat" (the model's template, the question as the user turn, RULER's answer prefix
    after the assistant header) or "raw" (document, then question with its answer prefix as plain text)."""

    prompt: str = "chat"
    max_new_tokens: int = 16
    max_new_tokens_long: int = 64


def _max_new(q: dict, cfg: SuiteConfig) -> int:
    many = len(q["answer"]) > 1
    uuid = q.get("shape") == "uuid"
    return cfg.max_new_tokens_long if (many or uuid) else cfg.max_new_tokens


def _split_question(text: str) -> tuple[str, str]:
    """RULER question "Q? Answer prefix" -> (question, answer prefix)."""
    if "? " in text:
        q, pre = text.split("? ", 1)
        return q + "?", pre
    return text, ""


def _question_parts(q: dict, cfg: SuiteConfig) -> tuple[str, str, bool]:
    """(question, answer cue, raw) as :func:`ask` lays them out."""
    if cfg.prompt == "raw":
        return " " + q["question"], "", True
    question, prefix = _split_question(q["question"])
    return question, (" " + prefix if prefix else ""), False


def ask(session, q: dict, cfg: SuiteConfig) -> str:
    """The reply to question ``q`` on the session's current cache (greedy, up to the first line break)."""
    session.reset_chat()
    question, cue, raw = _question_parts(q, cfg)
    gen = session.ask(question, max_new_tokens=_max_new(q, cfg), raw=raw, answer_prefix=cue)
    out = ""
    try:
        for piece in gen:
            out += piece
            if "\n" in out.strip():
                break
    finally:
        gen.close()
    return out.strip().split("\n", 1)[0]


def answer_logprob(session, q: dict, cfg: SuiteConfig) -> tuple[float, float]:
    """(NLL, token accuracy) of the gold answer after question ``q`` on the session's current cache.

    The question (as :func:`ask` lays it out, with its answer cue) followed by the gold answer (answers
    joined by ", ") is decoded in one pass; NLL is the mean -log p of the answer tokens (nats per token),
    token accuracy the fraction of them that are the argmax.  The cache is left as it was."""
    session.reset_chat()
    question, cue, raw = _question_parts(q, cfg)
    answer = " " + ", ".join(q["answer"])
    t_q, _ = session.chat.question(question, raw=raw, prefix=cue)
    t_qa, _ = session.chat.question(question + (answer if raw else ""), raw=raw, prefix="" if raw else cue + answer)
    k = len(t_q)
    if not np.array_equal(t_qa[:k], t_q):  # the cue's last token merged with the answer's first: score from there
        k = int(np.argmax(t_qa[:k] != t_q))
    k = max(1, k)
    p0, ctx = session.ctx.n_past, session.ctx
    try:
        logits = np.concatenate([ctx.decode(t_qa[i:i + ctx.n_batch], logits="all")
                                 for i in range(0, len(t_qa), ctx.n_batch)])
    finally:
        session.bridge.remove_from(p0)
    rows, target = logits[k - 1:-1], t_qa[k:]
    return float(token_nll(rows, target).mean()), float(np.mean(rows.argmax(axis=1) == target))


@dataclasses.dataclass
class Prepared:
    """A document ingested in full: its state, book and the evidence of every kind (float32[L, H, N])."""

    state: object
    doc_pos: np.ndarray
    rope_pos: np.ndarray
    evidence: dict[str, np.ndarray]
    n_tokens: int
    seconds: dict[str, float]


def prepare(session, context: str, *, need_replay: bool) -> Prepared:
    """Ingest ``context`` uncompressed and collect the evidence kinds (see the module docstring)."""
    from ..methods import H2O  # noqa: PLC0415

    session.method, session.budget = H2O(), Budget.parse(1.0)
    captured: dict[str, np.ndarray] = {}

    def grab(p) -> None:  # the accumulator is freed when ingest returns: read it after the last chunk
        if p.phase == "prefill" and p.done_tokens == p.total_tokens:
            captured["all"] = session.bridge.evidence()

    t0 = time.perf_counter()
    session.ingest(context, progress=grab)
    t_prefill = time.perf_counter() - t0
    br, ctx, toks = session.bridge, session.ctx, session.cache.tokens
    n = len(toks)
    if session.cache.n_cells != n:
        raise BenchError(f"a document of {n} tokens does not fit n_ctx {ctx.n_ctx} uncompressed (the suite compares "
                         f"every method with the full cache); pass a larger --n-ctx")
    ev = {"all": captured["all"], "none": None}
    w = min(SNAP_WINDOW, n - 1)
    br.enable_evidence(0)
    try:
        br.remove_from(n - w)
        br.reset_evidence()
        ctx.decode(toks[n - w:], logits="none")
        ev["window"] = br.evidence()
        br.remove_from(n - 1)
        br.reset_evidence()
        ctx.decode(toks[n - 1:], logits="none")
        ev["last"] = br.evidence()
    finally:
        br.disable_evidence()
    t1 = time.perf_counter()
    if need_replay:
        session.cache.replayed = 0
        ev["reconstruct"] = session._replay_scores()
    t_replay = time.perf_counter() - t1
    st = br.read()
    c = session.cache
    return Prepared(st, c.doc_pos.copy(), c.rope_pos.copy(), ev, n,
                    {"prefill": t_prefill, "replay": t_replay})


def compress(session, prep: Prepared, method: Method, budget: float) -> float:
    """Write the full cache back and compact it with ``method`` to ``budget``; returns seconds."""
    session.reset_chat()
    session.bridge.write(prep.state)
    ev = prep.evidence.get(method.evidence_kind)
    if method.evidence_kind != "none" and ev is None:
        raise ValueError(f"no evidence of kind {method.evidence_kind!r} was prepared")
    L, H, N = prep.doc_pos.shape
    c = session.cache
    c.doc_pos, c.rope_pos = prep.doc_pos.copy(), prep.rope_pos.copy()
    c.evidence = np.zeros((L, H, N), np.float32) if ev is None else ev.copy()
    session.method, session.budget = method, Budget.parse(budget)
    c.replayed = prep.n_tokens  # scores are in the cache already: nothing left to replay
    t0 = time.perf_counter()
    m = session.budget.cells(N)
    if m < N:
        session._compact_to(m, 0, False)
    return time.perf_counter() - t0


def run_document(session, rec: dict, configs: list[tuple[str, Method, float]], cfg: SuiteConfig,
                 progress: Callable[[int], None] | None = None) -> list[dict]:
    """Rows (one per configuration x question) for one document record."""
    need_replay = any(m.evidence_kind == "reconstruct" for _, m, _ in configs)
    prep = prepare(session, rec["context"], need_replay=need_replay)
    rows = []
    for name, method, budget in configs:
        t_c = compress(session, prep, method, budget)
        cells = session.cache.n_cells
        for qi, q in enumerate(rec["questions"]):
            t0 = time.perf_counter()
            out = ask(session, q, cfg)
            nll, tok_acc = answer_logprob(session, q, cfg)
            rows.append({"doc": rec["id"], "task": rec["task"], "shape": q.get("shape", rec.get("shape", "")),
                         "q": qi, "depth": q.get("depth"), "method": name, "budget": budget,
                         "score": score_all(out, q["answer"]), "output": out, "answer": q["answer"],
                         "nll": nll, "tok_acc": tok_acc,
                         "tokens": prep.n_tokens, "cells": cells, "t_compact": t_c,
                         "t_prefill": prep.seconds["prefill"], "t_replay": prep.seconds["replay"],
                         "t_decode": time.perf_counter() - t0})
        if progress is not None:
            progress(1)
    return rows
