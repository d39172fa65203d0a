"""``kvmerge-local bench`` without ``--tasks``: the RULER-style real-model suite in one command.

    kvmerge-local bench [--model smollm2-135m-instruct] [--n-per-task 4] [--lengths 1024,2048] \\
        [--methods full,kvzip,snapkv,...] [--budgets 0.5,0.25] [--prompt chat] \\
        [--ppl benchmarks/quality/tasks/ppl.jsonl [--ppl-limit K]] --out DIR

Generates the documents (:mod:`.ruler`, seeded; or reads ``--documents FILE``), runs every method x budget
on every document with a progress bar (:mod:`.suite`: one prefill per document), and writes
DIR/results.json, DIR/results.md and DIR/retention_vs_budget.png (:mod:`.suite_report`).  With ``--ppl``, the
same methods and budgets are also scored by the perplexity of held-out natural text continuing a compressed
prefix (:mod:`.perplexity`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ..memory import kv_type_arg
from ..errors import KVMergeError
from . import perplexity, ruler, suite, suite_report
from .harness import BenchError, RunConfig, make_method, parse_budgets, parse_methods, progress_bar, read_jsonl
from .harness import configs as config_pairs

log = logging.getLogger(__name__)

DEFAULT_METHODS = "full,kvzip,kvmerger+kvzip,cam+kvzip,snapkv,h2o,tova,streaming_llm,kvmerger+budget"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmerge-local bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF path or models.txt name (default: the real document model)")
    p.add_argument("--documents", type=Path, default=None, help="suite JSONL to read instead of generating")
    p.add_argument("--tasks-only", default=",".join(ruler.TASKS), help="task types to generate")
    p.add_argument("--n-per-task", type=int, default=4, help="documents per task type")
    p.add_argument("--lengths", default="1024,2048", help="document lengths in tokens, cycled")
    p.add_argument("--seed", type=int, default=ruler.BENCH_SEED)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--budgets", default="0.5,0.25")
    p.add_argument("--prompt", default="chat", choices=["chat", "raw"])
    p.add_argument("--n-ctx", type=int, default=None, help="default: the longest document + 640")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kv-type", default="f16", type=kv_type_arg,
                   help="the cache's element types, one or K/V (q8_0 / q4_0 halve / quarter its memory before any "
                        "eviction; q8_0/q4_0: K in q8_0, V in q4_0)")
    p.add_argument("--memory", default=None,
                   help="memory budgets instead of --budgets/--kv-type: fractions of the f16 full cache's bytes, each "
                        "met by quantizing first and evicting the rest (kvmerge_local/memory.py); methods are "
                        "reported as METHOD@TYPES against the f16 full cache")
    p.add_argument("--ppl", type=Path, default=None, help="JSONL {id, text}: also measure held-out perplexity")
    p.add_argument("--ppl-limit", type=int, default=None, help="at most this many perplexity texts")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..engine import Session  # noqa: PLC0415
    from ..models import default_document_model  # noqa: PLC0415

    try:
        names = parse_methods(a.methods)
        budgets = parse_budgets(a.budgets)
        lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
        if not lengths or min(lengths) < 128:
            raise BenchError("--lengths must be token counts >= 128")
        if a.n_per_task < 1:
            raise BenchError("--n-per-task must be >= 1")
        tasks = tuple(t.strip() for t in a.tasks_only.split(",") if t.strip())
        bad = [t for t in tasks if t not in ruler.TASKS]
        if bad:
            raise BenchError(f"unknown task type(s) {', '.join(bad)}; known: {', '.join(ruler.TASKS)}")
        configs = [("full", make_method("full"), 1.0)] if "full" in names else []
        configs += [(n, make_method(n), b) for n in names if n != "full" for b in budgets]
        if not any(n == "full" for n, _, _ in configs):
            raise BenchError("the suite needs 'full' among the methods (retention is measured against it)")
        memories = parse_budgets(a.memory) if a.memory is not None else None
        if memories is not None and (a.kv_type != "f16" or a.ppl):
            raise BenchError("--memory picks the cache types itself: give it without --kv-type and --ppl")
        model = a.model if a.model is not None else str(default_document_model())
        t0 = time.perf_counter()
        docs, n_ctx = _documents(a, model, lengths, tasks)
        runs = [(a.kv_type, configs, None)]
        if memories is not None:
            runs = [("f16", configs[:1], None)] + memory_runs(names, memories, _head_dim(model))
        rows, cfg = [], suite.SuiteConfig(prompt=a.prompt)
        for kv_type, confs, labels in runs:
            with Session.open(model, n_ctx=n_ctx, n_threads=a.threads, kv_type=kv_type,
                              chat_format="raw" if a.prompt == "raw" else None) as s:
                rows += relabel(_run(s, docs, confs, cfg, a.quiet), labels)
                label = s.model_label
        ppl = _perplexity(a, names, budgets, model, n_ctx) if a.ppl else None
        meta = {"model": label, "prompt": a.prompt, "kv_type": "by memory budget" if memories else a.kv_type,
                "budget_unit": "memory" if memories else "cells", "n_ctx": n_ctx, "documents": len(docs),
                "lengths": a.lengths, "seed": a.seed, "seconds": round(time.perf_counter() - t0, 1)}
        paths = suite_report.write(a.out, rows, meta, ppl)
    except (KVMergeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return suite_report.show(paths)


def _documents(a, model: str, lengths: list[int], tasks: tuple[str, ...]) -> tuple[list[dict], int]:
    """The suite's documents (generated with the model's tokenizer, or ``--documents``) and the n_ctx to run
    them: ``--n-ctx``, else the longest document in tokens + 640 (the chat template's tokens and the session's
    reserve of up to 512 cells for the question and answer, which KVzip's replay also uses)."""
    from ..engine import Session  # noqa: PLC0415

    if a.documents is not None and a.n_ctx:  # nothing to tokenize
        return read_documents(a.documents), a.n_ctx
    with Session.open(model, n_ctx=512, n_threads=a.threads, method="full", budget=1.0) as s:
        count = lambda t: len(s.model.tokenize(t))  # noqa: E731
        docs = read_documents(a.documents) if a.documents is not None else \
            ruler.generate(a.n_per_task, lengths, a.seed, count, tasks)
        return docs, a.n_ctx or max(count(d["context"]) for d in docs) + 640


def _perplexity(a, names: list[str], budgets: list[float], model: str, n_ctx: int) -> list[dict]:
    """Perplexity rows for every (method, budget) on ``--ppl``'s texts (one session per configuration)."""
    texts = perplexity.load_texts(a.ppl, a.ppl_limit)
    cfg = RunConfig(model=model, n_ctx=n_ctx, n_threads=a.threads, kv_type=a.kv_type)
    update, close = progress_bar(len(texts) * len(config_pairs(names, budgets)), a.quiet, "perplexity", "text")
    try:
        return perplexity.run(texts, names, budgets, cfg, progress=update)
    finally:
        close()


def _head_dim(model: str) -> int:
    from ..bridge import LlamaModel  # noqa: PLC0415
    from ..models import resolve_model  # noqa: PLC0415

    m = LlamaModel(resolve_model(model)[0])
    try:
        return m.geom.head_dim
    finally:
        m.close()


def memory_runs(names: list[str], memories: list[float], head_dim: int) -> list[tuple[str, list, dict]]:
    """One run per cache storage the memory budgets need: (kv_type, configs, labels), where labels maps a run's
    (method, cell budget) to the (``METHOD@TYPES``, memory budget) rows it stands for.  A plan that keeps every
    cell runs only ``full`` at that storage (any method keeps everything)."""
    from ..engine.sizing import plan_memory  # noqa: PLC0415

    runs: dict[str, tuple[list, dict]] = {}
    for m in memories:
        plan = plan_memory(m, head_dim)
        confs, labels = runs.setdefault(plan.storage.name, ([], {}))
        cells = plan.budget.value
        for n in (["full"] if cells == 1.0 else [n for n in names if n != "full"]):
            key = (n, cells)
            if key not in labels:
                confs.append((n, make_method(n), cells))
            labels.setdefault(key, []).append((f"{n}@{plan.storage.name}", m))
    return [(kv, confs, labels) for kv, (confs, labels) in runs.items()]


def relabel(rows: list[dict], labels: dict | None) -> list[dict]:
    """Rows of a memory run under their (``METHOD@TYPES``, memory budget) labels (one copy per label); the run's
    own cell budget is kept as ``cell_budget``.  ``labels`` None: the rows as they are."""
    if labels is None:
        return rows
    out = []
    for r in rows:
        for name, m in labels[(r["method"], r["budget"])]:
            out.append({**r, "method": name, "budget": m, "cell_budget": r["budget"]})
    return out


def read_documents(path: Path) -> list[dict]:
    """Document records of a suite file (:mod:`.ruler`'s format); BenchError names the file and line."""
    out = []
    for ln, r in read_jsonl(path, "suite document file"):
        if not r.get("context") or not r.get("questions"):
            raise BenchError(f"{path}:{ln}: a suite record needs 'context' and a non-empty 'questions' list")
        out.append(r)
    return out


def _run(session, docs: list[dict], configs, cfg, quiet: bool) -> list[dict]:
    update, close = progress_bar(len(docs) * len(configs), quiet, "documents x configurations")
    rows = []
    try:
        for d in docs:
            rows += suite.run_document(session, d, configs, cfg, progress=update)
    finally:
        close()
    return rows
