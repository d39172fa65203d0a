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

from ..defaults import KV_TYPE_NAMES
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
    p.add_argument("--kv-type", default="f16", choices=KV_TYPE_NAMES,
                   help="the cache's element type (q8_0 / q4_0 halve / quarter its memory before any eviction)")
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
        model = a.model if a.model is not None else str(default_document_model())
        t0 = time.perf_counter()
        docs, n_ctx = _documents(a, model, lengths, tasks)
        with Session.open(model, n_ctx=n_ctx, n_threads=a.threads, kv_type=a.kv_type,
                          chat_format="raw" if a.prompt == "raw" else None) as s:
            rows = _run(s, docs, configs, suite.SuiteConfig(prompt=a.prompt), a.quiet)
            label = s.model_label
        ppl = _perplexity(a, names, budgets, model, n_ctx) if a.ppl else None
        meta = {"model": label, "prompt": a.prompt, "kv_type": a.kv_type, "n_ctx": n_ctx, "documents": len(docs),
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
