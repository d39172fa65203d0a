#!/usr/bin/env python
"""Full-cache accuracy per task type and context length of the embedded model, through llama.cpp.

    python scripts/eval_tiny.py                      # 100 held-out tasks, 1K-4K tokens, committed model
    python scripts/eval_tiny.py --n 250 --write-json # and record the result in kvmerge-tiny.json
    python scripts/eval_tiny.py --tasks FILE.jsonl   # a task file in the benchmark's format

Tasks are generated with :func:`kvmerge_local.quality.tasks.generate_tasks` (the quality bench's generator)
from the held-out part of the machine's text (files never used in training) with a seed that training never used, lengths counted by llama.cpp's
tokenizer.  No torch needed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # train/ is not installed: import it from this checkout

from kvmerge_local.quality import tasks as data  # noqa: E402
from kvmerge_local.quality.harness import load_tasks  # noqa: E402
from train import llama_eval  # noqa: E402

DATA = ROOT / "kvmerge_local" / "data"
EVAL_SEED = 20261122


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DATA / "kvmerge-tiny.gguf"))
    ap.add_argument("--tasks", default=None, help="JSONL task file (default: generate held-out tasks)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--min-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-tasks", default=None, help="write the generated tasks to this JSONL")
    ap.add_argument("--write-json", action="store_true", help="store the result in kvmerge-tiny.json")
    ap.add_argument("--show", type=int, default=0, help="print this many wrong outputs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tasks:
        records = load_tasks(args.tasks)
    else:
        from kvmerge_local.bridge import LlamaModel

        tok = LlamaModel(args.model)
        records = data.generate_tasks(args.n, args.seed, args.min_tokens, args.max_tokens, split="heldout",
                                      count_tokens=data.llama_token_counter(tok))
        tok.close()
        if args.save_tasks:
            data.write_jsonl(args.save_tasks, records)
    res = llama_eval.evaluate(args.model, records, max_new_tokens=args.max_new_tokens, n_threads=args.threads)
    print(f"{Path(args.model).name}: full-cache accuracy through llama.cpp (answer contained in the greedy "
          f"output), {res['overall']['n']} tasks, {res['seconds']} s")
    print(llama_eval.format_table(res))
    print(f"overall: contains {res['overall']['contains']:.1%}, exact {res['overall']['exact']:.1%}")
    for row in [r for r in res["rows"] if not r["contains"]][: args.show]:
        print(f"  WRONG {row['id']} ({row['n_tokens']} tok): answer {row['answer']!r} output {row['output']!r}")
    if args.write_json:
        path = DATA / "kvmerge-tiny.json"
        info = json.loads(path.read_text())
        info["llama_cpp_eval"] = {k: res[k] for k in ("overall", "by_task", "by_length", "by_task_length")}
        info["llama_cpp_eval"].update(seed=args.seed, n=len(records), min_tokens=args.min_tokens,
                                      max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens,
                                      split="heldout", tasks_file=args.tasks)
        path.write_text(json.dumps(info, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
