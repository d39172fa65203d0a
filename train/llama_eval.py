"""Full-cache task accuracy of a GGUF model through llama.cpp (the KV bridge); no torch.

For each task record ``{"task", "context", "question", "answer", ...}`` (:mod:`kvmerge_local.quality.tasks`):
tokenize ``context + question`` as ONE text (with BOS), decode it into an empty cache, then greedy-decode up to
``max_new_tokens`` tokens, stopping at an end-of-generation token or a newline.  Scored by the benchmark's
one scorer, :func:`kvmerge_local.quality.harness.score`: ``contains`` = the normalized answer occurs (as whole
words) in the normalized output; ``exact`` = the normalized output equals the normalized answer (so a chain of
thought said aloud before the answer counts for ``contains`` only).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from kvmerge_local.quality.harness import score

logger = logging.getLogger(__name__)


def generate(model, ctx, prompt: str, max_new_tokens: int = 48) -> tuple[str, int, float]:
    """Greedy continuation of ``prompt`` from an empty cache; returns (text, prompt tokens, seconds)."""
    ctx.clear()
    t0 = time.time()
    toks = model.tokenize(prompt, add_bos=True)
    if len(toks) + max_new_tokens > ctx.n_ctx:
        raise ValueError(f"prompt of {len(toks)} tokens + {max_new_tokens} does not fit n_ctx={ctx.n_ctx}")
    logits = None
    for i in range(0, len(toks), ctx.n_batch):
        logits = ctx.decode(toks[i:i + ctx.n_batch], logits="last")
    out = b""
    for _ in range(max_new_tokens):
        t = int(np.argmax(logits))
        if model.is_eog(t):
            break
        piece = model.piece(t)
        if b"\n" in piece:
            break
        out += piece
        logits = ctx.decode(np.array([t], np.int32), logits="last")
    return out.decode("utf-8", "replace"), len(toks), time.time() - t0


def length_bucket(n_tokens: int) -> str:
    """``"<=1K"``, ``"1-2K"``, ``"2-3K"``, ``"3-4K"``, ``">4K"`` by prompt length in tokens."""
    for hi, name in ((1024, "<=1K"), (2048, "1-2K"), (3072, "2-3K"), (4096, "3-4K")):
        if n_tokens <= hi:
            return name
    return ">4K"


def evaluate(model_path: str | Path, records: list[dict], *, n_ctx: int = 4352, max_new_tokens: int = 48,
             n_threads: int = 2, flash_attn: bool = True) -> dict:
    """Run every record; returns ``{"overall", "by_task", "by_length", "by_task_length": {name: {"n",
    "contains", "exact"}}, "rows": [...], "seconds"}`` (accuracies are fractions)."""
    from kvmerge_local.bridge import LlamaContext, LlamaModel  # noqa: PLC0415

    model = LlamaModel(model_path)
    rows = []
    t0 = time.time()
    try:
        with LlamaContext(model, n_ctx=n_ctx, n_batch=512, n_threads=n_threads, flash_attn=flash_attn) as ctx:
            for r in records:
                out, n_tok, sec = generate(model, ctx, r["context"] + r["question"], max_new_tokens)
                contains, exact = score(out, r["answer"])
                rows.append({"id": r["id"], "task": r["task"], "n_tokens": n_tok, "answer": r["answer"],
                             "output": out, "contains": contains, "exact": exact, "seconds": round(sec, 3)})
    finally:
        model.close()
    groups: dict[str, dict[str, list[dict]]] = {"overall": defaultdict(list), "by_task": defaultdict(list),
                                                "by_length": defaultdict(list), "by_task_length": defaultdict(list)}
    for row in rows:
        b = length_bucket(row["n_tokens"])
        groups["overall"]["all"].append(row)
        groups["by_task"][row["task"]].append(row)
        groups["by_length"][b].append(row)
        groups["by_task_length"][f"{row['task']} {b}"].append(row)

    def agg(rs: list[dict]) -> dict:
        return {"n": len(rs), "contains": round(float(np.mean([x["contains"] for x in rs])), 4),
                "exact": round(float(np.mean([x["exact"] for x in rs])), 4)}

    res = {k: {name: agg(rs) for name, rs in sorted(g.items())} for k, g in groups.items()}
    res["overall"] = res["overall"]["all"]
    res["rows"] = rows
    res["seconds"] = round(time.time() - t0, 1)
    return res


def format_table(res: dict) -> str:
    """A Markdown table: task rows x length-bucket columns of ``contains`` accuracy (n in parentheses)."""
    tasks = sorted(res["by_task"])
    buckets = [b for b in ("<=1K", "1-2K", "2-3K", "3-4K", ">4K") if b in res["by_length"]]
    lines = ["| task | " + " | ".join(buckets) + " | all |", "|---" * (len(buckets) + 2) + "|"]
    for t in tasks + ["all"]:
        cells = []
        for b in buckets:
            g = res["by_length"].get(b) if t == "all" else res["by_task_length"].get(f"{t} {b}")
            cells.append(f"{g['contains']:.0%} ({g['n']})" if g else "-")
        g = res["overall"] if t == "all" else res["by_task"][t]
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {g['contains']:.0%} ({g['n']}) |")
    return "\n".join(lines)
