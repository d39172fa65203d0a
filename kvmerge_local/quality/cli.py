"""``kvmerge-local bench``: accuracy (and perplexity) of every method x budget on a task file.

    kvmerge-local bench --tasks benchmarks/quality/tasks/default.jsonl --methods full,h2o,kvmerger \\
        --budgets 0.5,0.35,0.2 [--model M] [--n-ctx N] [--limit K] [--max-new-tokens T] \\
        [--ppl benchmarks/quality/tasks/ppl.jsonl] --out DIR

``full`` runs once (budget 1.0); every other method at every budget.  ``--limit K`` keeps the first K tasks of
each task type.  Writes DIR/results.json, DIR/results.md and PNG plots (see :mod:`.report`).  Bad arguments
(unknown method, budget outside (0, 1], missing or malformed task file) print one ``error:`` line, exit 2.
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
from . import harness, perplexity, report, suite_report

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmerge-local bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF path or models.txt name (default: the embedded model)")
    p.add_argument("--tasks", required=True, type=Path, help="JSONL: {id, task, context, question, answer} per line "
                   "(without --tasks, `kvmerge-local bench` runs the real-model RULER-style suite: see quality/suite_cli.py)")
    p.add_argument("--methods", default="full,streaming_llm,h2o,snapkv,tova,cam,kvmerger",
                   help="comma-separated method names (kvmerge-local methods; also cam+<selection>)")
    p.add_argument("--budgets", default="0.5,0.35,0.2", help="comma-separated fractions in (0, 1]")
    p.add_argument("--n-ctx", type=int, default=4608, help="context cells (room for the longest task + answer)")
    p.add_argument("--limit", type=int, default=None, help="at most K tasks per task type")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--stop", default="\\n", help="stop generating at this string (default: newline; '' = never)")
    p.add_argument("--prompt", default="auto", choices=["auto", "raw", "chat"],
                   help="raw: the file's text exactly; chat: the model's template; auto: raw unless it has one")
    p.add_argument("--kv-type", default="f16", type=kv_type_arg,
                   help="cache element types: one for K and V, or K/V (e.g. q8_0/q4_0)")
    p.add_argument("--position-policy", default="auto", choices=["auto", "keep", "reindex"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ppl", type=Path, default=None, help="JSONL {id, text}: also measure held-out perplexity")
    p.add_argument("--ppl-limit", type=int, default=None, help="at most this many perplexity texts")
    p.add_argument("--ppl-suffix-tokens", type=int, default=256)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _sha256(model: str | None) -> str:
    """sha256 of the model file (which checkpoint produced the numbers)."""
    import hashlib  # noqa: PLC0415

    from ..models import resolve_model  # noqa: PLC0415

    h = hashlib.sha256()
    with open(resolve_model(model)[0], "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run, write the reports; returns the exit status (2 on a user error)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = sys.argv[1:] if argv is None else list(argv)
    if not any(x == "--tasks" or x.startswith("--tasks=") for x in args) and not any(x in ("-h", "--help") for x in args):
        from . import suite_cli  # noqa: PLC0415  (no task file: the real-model suite)

        return suite_cli.main(args)
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.verbose:  # per-configuration accuracy lines (also under `kvmerge-local bench`, whose root logger is set)
        logging.getLogger("kvmerge_local.quality").setLevel(logging.INFO)
    try:
        methods = harness.parse_methods(a.methods)
        budgets = harness.parse_budgets(a.budgets)
        if a.n_ctx < 64:
            raise harness.BenchError(f"--n-ctx must be >= 64, got {a.n_ctx}")
        if a.max_new_tokens < 1:
            raise harness.BenchError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
        records = harness.load_tasks(a.tasks, a.limit)
        texts = perplexity.load_texts(a.ppl, a.ppl_limit) if a.ppl else []
        stop = a.stop.encode().decode("unicode_escape") if a.stop else None
        cfg = harness.RunConfig(model=a.model, n_ctx=a.n_ctx, max_new_tokens=a.max_new_tokens, stop=stop,
                                n_threads=a.threads, kv_type=a.kv_type, prompt=a.prompt,
                                position_policy=a.position_policy)
        confs = harness.configs(methods, budgets)
        t0 = time.perf_counter()
        update, close = harness.progress_bar(len(confs) * len(records), a.quiet, "tasks")
        try:
            rows = harness.run(records, methods, budgets, cfg, progress=update)
        finally:
            close()
        ppl_rows = None
        if texts:
            update, close = harness.progress_bar(len(confs) * len(texts), a.quiet, "perplexity")
            try:
                ppl_rows = perplexity.run(texts, methods, budgets, cfg, max_suffix_tokens=a.ppl_suffix_tokens,
                                          progress=update)
            finally:
                close()
        meta = {"model": a.model or "kvmerge-tiny.gguf (embedded)", "model_sha256": _sha256(a.model), "tasks": str(a.tasks), "n_tasks": len(records),
                "limit_per_type": a.limit, "n_ctx": a.n_ctx, "max_new_tokens": a.max_new_tokens,
                "kv_type": a.kv_type, "position_policy": a.position_policy,
                "ppl_texts": len(texts), "seconds": round(time.perf_counter() - t0, 1)}
        paths = report.write(a.out, rows, ppl_rows, meta)
    except (KVMergeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return suite_report.show(paths)


if __name__ == "__main__":
    sys.exit(main())
