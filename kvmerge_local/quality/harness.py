"""The quality benchmark's core: task files, method specs, scoring, and one run per method x budget x task.

Task file: JSONL, one object per line with at least ``{"id", "task", "context", "question", "answer"}`` (str
values; extra keys are ignored).  For each record and each (method, budget):

1. ``Session.ingest(context)`` -- the document is prefilled and compressed to the budget (the engine compacts
   at the end of ingest to ``budget x tokens`` even when the document fits in ``n_ctx``), before the question
   is seen, as in document chat;
2. ``Session.ask(question, raw=True)`` -- the question continues the cached document tokens by the seam rule, so
   the tokens fed are exactly those of ``context + question`` tokenized as ONE text (BOS first).  Trailing
   whitespace of the context (which ingest strips) is moved to the front of the question;
3. greedy decoding up to ``max_new_tokens``, stopped early at ``stop`` (a newline by default: every task's
   answer is on the answer line).

Scores (:func:`score`): ``contains`` = the normalized answer occurs as whole words in the normalized output;
``exact`` = the normalized output (up to the stop string) equals the normalized answer.

With a chat model (``prompt="chat"``), ``ask`` wraps the question in the model's template instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import string
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import KVMergeError
from ..methods import REGISTRY, Method, get_method
from ..methods.base import Selection
from ..methods.cam import CaM

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("id", "task", "context", "question", "answer")
FULL = "full"


class BenchError(KVMergeError):
    """A benchmark input a user can fix: task file, method name, budget."""


# ------------------------------------------------------------------------------------------------ tasks
def read_jsonl(path: Path, what: str) -> Iterable[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; BenchError names the file (as ``what``)
    and the line when it is missing, a line is not JSON, or a line is not a JSON object."""
    if not path.is_file():
        raise BenchError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchError(f"{path}:{ln}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(r, dict):
                raise BenchError(f"{path}:{ln}: expected a JSON object, got {type(r).__name__}")
            yield ln, r


def load_tasks(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records of a JSONL task file, validated (BenchError names the file and line on a problem).

    ``limit``: keep at most this many records PER TASK TYPE (file order), so every type stays represented.
    """
    p = Path(path)
    recs: list[dict] = []
    seen: set[str] = set()
    for ln, r in read_jsonl(p, "task file"):
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise BenchError(f"{p}:{ln}: missing key(s) {', '.join(missing)} (need {', '.join(REQUIRED_KEYS)})")
        bad = [k for k in REQUIRED_KEYS if not isinstance(r[k], str)]
        if bad:
            raise BenchError(f"{p}:{ln}: key(s) {', '.join(bad)} must be strings")
        if not r["context"].strip() or not r["question"] or not r["answer"].strip():
            raise BenchError(f"{p}:{ln}: empty context, question or answer")
        if r["id"] in seen:
            raise BenchError(f"{p}:{ln}: duplicate id {r['id']!r}")
        seen.add(r["id"])
        recs.append(r)
    if not recs:
        raise BenchError(f"task file {p} has no records")
    if limit is not None:
        if limit < 1:
            raise BenchError(f"--limit must be >= 1, got {limit}")
        count: dict[str, int] = {}
        kept = []
        for r in recs:
            if count.get(r["task"], 0) < limit:
                count[r["task"]] = count.get(r["task"], 0) + 1
                kept.append(r)
        recs = kept
    return recs


# ---------------------------------------------------------------------------------------------- methods
def parse_budgets(text: str) -> list[float]:
    """``"0.5,0.35,0.2"`` -> [0.5, 0.35, 0.2]; each a fraction in (0, 1] (BenchError otherwise)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = float(part)
        except ValueError:
            raise BenchError(f"budget {part!r} is not a number; give fractions in (0, 1], e.g. 0.5,0.35,0.2") from None
        if not 0.0 < v <= 1.0:
            raise BenchError(f"budget {v} is out of range: a budget is the fraction of tokens kept, in (0, 1]")
        out.append(v)
    if not out:
        raise BenchError("no budgets given")
    return out


def make_method(name: str) -> Method:
    """A method by registry name; ``cam+<selection>`` also works for a selection method not pre-registered
    (e.g. ``cam+tova``).  BenchError for unknown names."""
    if name in REGISTRY:
        return get_method(name)
    if name.startswith("cam+") and isinstance(REGISTRY.get(name[4:]), Selection):
        return CaM(base=get_method(name[4:]))
    raise BenchError(f"unknown method {name!r}; known: {', '.join(k for k in REGISTRY if k != 'cam')} "
                     "(and cam+<any selection method>)")


def parse_methods(text: str) -> list[str]:
    """``"full,h2o,kvmerger"`` -> names, validated (unknown names raise BenchError), duplicates dropped."""
    names = [x.strip() for x in str(text).split(",") if x.strip()]
    if not names:
        raise BenchError("no methods given")
    for n in names:
        make_method(n)
    return list(dict.fromkeys(names))


def configs(methods: Iterable[str], budgets: Iterable[float]) -> list[tuple[str, float]]:
    """(method, budget) pairs to run: ``full`` once at budget 1.0, every other method at every budget."""
    out = []
    for m in methods:
        if m == FULL:
            out.append((m, 1.0))
        else:
            out += [(m, float(b)) for b in budgets]
    return out


# ---------------------------------------------------------------------------------------------- scoring
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, articles (a/an/the) dropped, whitespace collapsed."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def score(output: str, answer: str) -> tuple[bool, bool]:
    """(contains, exact): the normalized answer occurs as whole words in the normalized output; the
    normalized output equals the normalized answer."""
    o, a = normalize(output), normalize(answer)
    if not a:
        return False, False
    return (f" {a} " in f" {o} "), o == a


# ---------------------------------------------------------------------------------------------- prompts
def split_prompt(context: str, question: str) -> tuple[str, str]:
    """(document text, question text) whose concatenation is ``context + question`` and whose document part
    survives ingest unchanged (ingest strips trailing whitespace: it moves to the question)."""
    doc = context.rstrip()
    return doc, context[len(doc):] + question


def expected_tokens(model, context: str, question: str) -> np.ndarray:
    """int32[n]: BOS + the tokens of ``context + question`` tokenized at once (what the model must read)."""
    return model.tokenize(context + question, add_bos=True)


def fed_tokens(model, context: str, question: str) -> np.ndarray:
    """int32[n]: what the session feeds for (context, question) with ``raw=True``: the ingested document's
    tokens, then the question's by the engine's seam rule (:func:`~kvmerge_local.engine.chat.continue_tokens`)."""
    from ..engine.chat import continue_tokens  # noqa: PLC0415
    from ..engine.conversation import TAIL_CHARS  # noqa: PLC0415
    from ..engine.documents import load_document  # noqa: PLC0415

    doc, q = split_prompt(context, question)
    text = load_document(doc).text
    toks = model.tokenize(text, add_bos=True)
    return np.concatenate([toks, continue_tokens(model, text[-TAIL_CHARS:], int(toks[-1]), q)]).astype(np.int32)


# ---------------------------------------------------------------------------------------------- running
@dataclasses.dataclass
class RunConfig:
    """Settings shared by every run: model (path/name/None), n_ctx, max_new_tokens, stop string (None = run
    to max_new_tokens), threads, kv cache type, prompt ("auto" | "raw" | "chat"), position policy."""

    model: str | None = None
    n_ctx: int = 4608
    max_new_tokens: int = 48
    stop: str | None = "\n"
    n_threads: int | None = None
    kv_type: str = "f16"
    prompt: str = "auto"
    position_policy: str = "auto"
    flash_attn: bool = True


def progress_bar(total: int, quiet: bool, desc: str, unit: str = "run"):
    """(update, close) of a tqdm bar on stderr, or no-ops when ``quiet``."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm  # noqa: PLC0415

    b = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    return b.update, b.close


def open_session(cfg: RunConfig, method: str, budget: float):
    """A :class:`~kvmerge_local.engine.Session` for one (method, budget)."""
    from ..engine import Session  # noqa: PLC0415

    return Session.open(cfg.model, n_ctx=cfg.n_ctx, kv_type=cfg.kv_type, flash_attn=cfg.flash_attn,
                        n_threads=cfg.n_threads, method=method if method in REGISTRY else make_method(method),
                        budget=1.0 if method == FULL else budget, position_policy=cfg.position_policy)


def answer(session, rec: dict, cfg: RunConfig) -> dict:
    """Run one record on an open session; returns a result row (output, scores, times, cells, bytes)."""
    raw = cfg.prompt == "raw" or (cfg.prompt == "auto" and session.fmt.name == "raw")
    doc, q = split_prompt(rec["context"], rec["question"]) if raw else (rec["context"], rec["question"].strip())
    st0 = session.ingest(doc)
    pieces: list[str] = []
    gen = session.ask(q, max_new_tokens=cfg.max_new_tokens, raw=raw)
    try:
        for piece in gen:
            pieces.append(piece)
            if cfg.stop and cfg.stop in "".join(pieces).lstrip():
                break
    finally:
        gen.close()
    out = "".join(pieces)
    if cfg.stop:
        head = out.lstrip()
        out = out[: len(out) - len(head)] + head.split(cfg.stop, 1)[0]
    st = session.stats
    contains, exact = score(out, rec["answer"])
    return {"id": rec["id"], "task": rec["task"], "answer": rec["answer"], "output": out,
            "contains": contains, "exact": exact, "tokens": st0.tokens_ingested, "cells": st0.doc_cells,
            "kv_bytes_full": st0.kv_bytes_full, "kv_bytes_now": st0.kv_bytes_now, "t_prefill": st0.t_prefill,
            "t_compact": st0.t_compact, "t_decode": st.t_decode, "n_compactions": st0.n_compactions}


def run(records: list[dict], methods: list[str], budgets: list[float], cfg: RunConfig,
        progress: Callable[[int], None] | None = None) -> list[dict]:
    """Every (method, budget) of :func:`configs` on every record; one row per run (see :func:`answer`) with
    ``method`` and ``budget`` added.  ``progress(1)`` after each run.  Sessions: one per (method, budget)."""
    rows = []
    for method, budget in configs(methods, budgets):
        t0 = time.perf_counter()
        with open_session(cfg, method, budget) as s:
            for rec in records:
                row = answer(s, rec, cfg)
                row.update(method=method, budget=budget)
                rows.append(row)
                if progress is not None:
                    progress(1)
        mine = rows[-len(records):]
        log.info("%s @ %.2f: contains %.3f, exact %.3f (%d tasks, %.1f s)", method, budget,
                 float(np.mean([r["contains"] for r in mine])), float(np.mean([r["exact"] for r in mine])),
                 len(records), time.perf_counter() - t0)
    return rows
