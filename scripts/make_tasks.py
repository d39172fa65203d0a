#!/usr/bin/env python
"""Write the benchmark's default task set and held-out perplexity texts (seeded, reproducible on one machine).

    python scripts/make_tasks.py                       # benchmarks/quality/tasks/{default,ppl}.jsonl
    python scripts/make_tasks.py --n-per-task 40 --min-tokens 2048 --max-tokens 4000 --out my.jsonl

Tasks come from :func:`kvmerge_local.quality.tasks.generate_tasks` (the quality bench's generator, which the
trainer also uses: niah_single, niah_multikey, variable_tracking, multi_hop, qa_filler) with filler from the
HELD-OUT part of the machine's text (files the trainer never reads) and a seed no training or evaluation run uses (training 1234, its evaluation
1241, scripts/eval_tiny.py 20261122).  Lengths are counted with llama.cpp's tokenizer of the model.
Perplexity texts: paragraphs of held-out text of about ``--ppl-tokens`` tokens each.  No torch needed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kvmerge_local.quality import tasks as data  # noqa: E402

log = logging.getLogger("make_tasks")
ROOT = Path(__file__).resolve().parent.parent
BENCH_SEED = 60_061_123
"""Seed of the default task set: distinct from every seed the trainer and its evaluations use."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "kvmerge_local" / "data" / "kvmerge-tiny.gguf"),
                    help="GGUF whose tokenizer counts the lengths")
    ap.add_argument("--n-per-task", type=int, default=20)
    ap.add_argument("--min-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=3072)
    ap.add_argument("--seed", type=int, default=BENCH_SEED)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "quality" / "tasks" / "default.jsonl")
    ap.add_argument("--ppl-out", type=Path, default=ROOT / "benchmarks" / "quality" / "tasks" / "ppl.jsonl")
    ap.add_argument("--ppl-n", type=int, default=12, help="perplexity texts (0: none)")
    ap.add_argument("--ppl-tokens", type=int, default=1536)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.seed in (1234, 1241, 20261122):
        ap.error(f"seed {args.seed} is used by training or its evaluation; pick another")
    from kvmerge_local.bridge import LlamaModel  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    tok = LlamaModel(args.model)
    try:
        count = data.llama_token_counter(tok)
        corpus = data.load_corpus()
        n = args.n_per_task * len(data.TASKS)
        recs = data.generate_tasks(n, args.seed, args.min_tokens, args.max_tokens, corpus=corpus,
                                   split="heldout", count_tokens=count)
        data.write_jsonl(args.out, recs)
        lens = [len(tok.tokenize(r["context"] + r["question"], add_bos=True)) for r in recs]
        log.info("wrote %s: %d tasks (%d per type), %d-%d tokens (mean %.0f), seed %d", args.out, len(recs),
                 args.n_per_task, min(lens), max(lens), float(np.mean(lens)), args.seed)
        if args.ppl_n > 0:
            asm = data.Assembler(corpus, count)
            rng = np.random.default_rng([args.seed, 1])
            texts = [{"id": f"ppl-{args.seed}-{i}", "text": asm.context(rng, args.ppl_tokens, data.Facts(), "heldout")}
                     for i in range(args.ppl_n)]
            data.write_jsonl(args.ppl_out, texts)
            log.info("wrote %s: %d held-out texts of ~%d tokens", args.ppl_out, len(texts), args.ppl_tokens)
    finally:
        tok.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
