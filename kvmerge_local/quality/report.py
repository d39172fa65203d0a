"""Aggregation and output of benchmark runs: ``results.json``, ``results.md`` and PNG plots.

Input rows are :func:`~kvmerge_local.quality.harness.answer` dicts with ``method`` and ``budget``.  Aggregated
rows (one per method x budget x task type, plus ``task == "all"``)::

    {"method", "budget", "task", "n", "accuracy", "exact", "t_prefill", "t_compact", "t_decode",
     "cells", "tokens", "kv_bytes", "kv_bytes_full"}

``accuracy`` / ``exact`` are fractions in [0, 1]; times are mean seconds per task; ``cells`` / ``tokens`` /
``kv_bytes`` / ``kv_bytes_full`` are means of the cache after ingest (before the question).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ALL = "all"


def aggregate(rows: list[dict]) -> list[dict]:
    """One dict per (method, budget, task) and per (method, budget, "all"), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"], ALL), []).append(r)
        groups.setdefault((r["method"], r["budget"], r["task"]), []).append(r)

    def mean(rs, k) -> float:
        return float(np.mean([float(x[k]) for x in rs]))

    out = []
    for (m, b, t), rs in groups.items():
        out.append({"method": m, "budget": b, "task": t, "n": len(rs),
                    "accuracy": round(mean(rs, "contains"), 4), "exact": round(mean(rs, "exact"), 4),
                    "t_prefill": round(mean(rs, "t_prefill"), 4), "t_compact": round(mean(rs, "t_compact"), 4),
                    "t_decode": round(mean(rs, "t_decode"), 4), "cells": round(mean(rs, "cells"), 1),
                    "tokens": round(mean(rs, "tokens"), 1), "kv_bytes": int(mean(rs, "kv_bytes_now")),
                    "kv_bytes_full": int(mean(rs, "kv_bytes_full"))})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def markdown(agg: list[dict], ppl: list[dict] | None = None, meta: dict | None = None) -> str:
    """A Markdown report: accuracy per method x budget (columns: all and each task type), then times,
    then perplexity when given."""
    tasks = list(dict.fromkeys(r["task"] for r in agg if r["task"] != ALL))
    keys = list(dict.fromkeys((r["method"], r["budget"]) for r in agg))
    by = {(r["method"], r["budget"], r["task"]): r for r in agg}
    ppl_by = {(p["method"], p["budget"]): p for p in (ppl or [])}
    lines = []
    if meta:
        lines.append("Run: " + ", ".join(f"{k} {v}" for k, v in meta.items()) + "\n")
    head = ["method", "budget", "acc % (exact %)"] + tasks + ["cells", "KV MiB", "prefill s", "compact s",
                                                             "decode s"] + (["ppl"] if ppl else [])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * len(head)) + "|")
    for m, b in keys:
        a = by[(m, b, ALL)]
        cells = [m, f"{b:g}", f"**{_pct(a['accuracy'])}** ({_pct(a['exact'])})"]
        cells += [_pct(by[(m, b, t)]["accuracy"]) if (m, b, t) in by else "-" for t in tasks]
        cells += [f"{a['cells']:.0f}", f"{a['kv_bytes'] / (1 << 20):.2f}", f"{a['t_prefill']:.2f}",
                  f"{a['t_compact']:.3f}", f"{a['t_decode']:.2f}"]
        if ppl:
            p = ppl_by.get((m, b))
            cells.append(f"{p['ppl']:.2f}" if p else "-")
        lines.append("| " + " | ".join(cells) + " |")
    n = by[keys[0] + (ALL,)]["n"] if keys else 0
    lines.append(f"\nacc: answer contained in the output (normalized); exact: output equals the answer; {n} tasks "
                 "per row; times are means per task; cells / KV MiB: the document's cache after compression.")
    return "\n".join(lines) + "\n"


def plots(agg: list[dict], out_dir: str | Path, ppl: list[dict] | None = None) -> list[Path]:
    """PNG plots in ``out_dir``: accuracy vs budget per method (the full cache as a dashed line),
    mean compaction seconds per method, and perplexity vs budget when ``ppl`` is given.  Returns the paths."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overall = [r for r in agg if r["task"] == ALL]
    methods = list(dict.fromkeys(r["method"] for r in overall))
    paths = []

    colors = {m: plt.get_cmap("tab20")((2 * i) % 20 + (2 * i // 20) % 2) for i, m in enumerate(methods)}
    budgets = sorted({r["budget"] for r in overall if r["method"] != "full"})
    base = [m for m in methods if "+" not in m]
    variants = [m for m in methods if "+" in m]
    panels = [("methods", base)] + ([("variants (ablations, CaM; kvmerger for reference)",
                                      ["full"] + [m for m in ("kvmerger",) if m in methods] + variants)]
                                    if variants else [])

    def curve(rows, key, ylabel, title, path):
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False, sharey=True)
        for ax, (sub, names) in zip(axes[0], panels):
            for m in names:
                rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["budget"])
                if not rs:
                    continue
                if m == "full":
                    ax.axhline(rs[0][key], color="k", ls="--", lw=1.2, label="full cache")
                    continue
                style = "-" if m.startswith("kvmerger") else (":" if m.startswith("cam") else "-.")
                ax.plot([r["budget"] for r in rs], [r[key] for r in rs], style, marker="o", ms=4, label=m,
                        color=colors[m])
            ax.set_xlabel("budget (fraction of tokens kept)")
            ax.set_xticks(budgets)
            ax.set_title(f"{title}: {sub}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        axes[0][0].set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    curve([dict(r, accuracy=100 * r["accuracy"]) for r in overall], "accuracy", "accuracy (%)",
          "Accuracy vs KV budget", out_dir / "accuracy_vs_budget.png")

    comp = [m for m in methods if m != "full"]
    if comp:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        vals = [1000 * float(np.mean([r["t_compact"] for r in overall if r["method"] == m])) for m in comp]
        ax.barh(comp, vals, color="tab:blue")
        ax.set_xlabel("compaction time per document (ms, mean over budgets)")
        ax.set_title("Compaction time per method")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        p = out_dir / "compaction_time.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    if ppl:
        curve(ppl, "ppl", "perplexity of the suffix", "Held-out perplexity", out_dir / "perplexity_vs_budget.png")
    return paths


def write(out_dir: str | Path, rows: list[dict], ppl: list[dict] | None = None, meta: dict | None = None) -> dict:
    """Write ``results.json`` (meta, aggregated rows, perplexity, per-task rows), ``results.md`` and the plots.
    Returns ``{"json", "md", "plots"}`` paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    pj = out_dir / "results.json"
    pj.write_text(json.dumps({"meta": meta or {}, "results": agg, "perplexity": ppl or [], "runs": rows},
                             indent=1) + "\n")
    pm = out_dir / "results.md"
    pm.write_text(markdown(agg, ppl, meta))
    pp = plots(agg, out_dir, ppl)
    log.info("wrote %s, %s and %d plot(s)", pj, pm, len(pp))
    return {"json": pj, "md": pm, "plots": pp}
