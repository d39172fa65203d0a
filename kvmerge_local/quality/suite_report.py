"""Aggregates of the real-model suite: accuracy with 95% intervals and retention against the full cache.

Rows come from :func:`.suite.run_document` (one per method x budget x question).  Intervals are percentile
bootstrap intervals over DOCUMENTS (questions of one document share its compressed cache, so they are not
independent), 2000 resamples, seeded.  *Retention* = accuracy of the method / accuracy of the full cache on
the same questions (a paired ratio: both come from the same resample).  Breakdowns: task type, answer shape
and needle depth (thirds of the document).

Teacher-forced answer measures (rows with ``nll`` / ``tok_acc``, see :func:`.suite.answer_logprob`): every
question counts, not only those the full cache answers, so they separate methods that exact-match retention,
resting on a few dozen answered questions, cannot.  *dNLL* = mean over questions of (the gold answer's NLL per
token with the method - with the full cache), nats; *token retention* = token accuracy ÷ the full cache's.
Both are paired and bootstrapped over documents like retention.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

N_BOOT = 2000
DEPTHS = ((0.0, 1 / 3, "start"), (1 / 3, 2 / 3, "middle"), (2 / 3, 1.01, "end"))


def _depth_bin(d) -> str:
    if d is None:
        return "-"
    for lo, hi, name in DEPTHS:
        if lo <= float(d) < hi:
            return name
    return "end"


def _resample(docs: list[str], seed: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(inv, n_doc, w): each question's document index, the number of documents, and float[N_BOOT, n_doc] how
    often each document is drawn in each bootstrap resample (documents are the resampling unit)."""
    uniq, inv = np.unique(np.asarray(docs), return_inverse=True)
    n_doc = len(uniq)
    idx = np.random.default_rng(seed).integers(0, n_doc, (N_BOOT, n_doc))
    return inv, n_doc, np.stack([np.bincount(r, minlength=n_doc) for r in idx]).astype(float)


def _boot(docs: list[str], method: np.ndarray, full: np.ndarray, seed: int = 0) -> dict:
    """Accuracy and retention with bootstrap intervals; ``method``/``full``: per-question scores in [0, 1],
    ``docs``: the document of each question (the resampling unit)."""
    inv, n_doc, w = _resample(docs, seed)
    s_m = np.bincount(inv, weights=method, minlength=n_doc)
    s_f = np.bincount(inv, weights=full, minlength=n_doc)
    cnt = np.bincount(inv, minlength=n_doc).astype(float)
    acc_b = (w @ s_m) / np.maximum(w @ cnt, 1)
    full_b = (w @ s_f) / np.maximum(w @ cnt, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ret_b = acc_b / full_b
    acc, fa = float(method.mean()), float(full.mean())
    ret = acc / fa if fa > 0 else float("nan")
    ret_b = ret_b[np.isfinite(ret_b)]
    return {"acc": acc, "acc_lo": float(np.percentile(acc_b, 2.5)), "acc_hi": float(np.percentile(acc_b, 97.5)),
            "full": fa, "retention": ret,
            "ret_lo": float(np.percentile(ret_b, 2.5)) if len(ret_b) else float("nan"),
            "ret_hi": float(np.percentile(ret_b, 97.5)) if len(ret_b) else float("nan"),
            "n": int(len(method)), "n_docs": n_doc}


def _boot_diff(docs: list[str], diff: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-question ``diff`` with a 95% bootstrap interval over documents."""
    inv, n_doc, w = _resample(docs, seed)
    s = np.bincount(inv, weights=diff, minlength=n_doc)
    cnt = np.bincount(inv, minlength=n_doc).astype(float)
    b = (w @ s) / np.maximum(w @ cnt, 1)
    return float(diff.mean()), float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))


def _teacher_forced(rs: list[dict], full: dict) -> dict:
    """dNLL and token-accuracy retention of rows ``rs`` against the full cache's rows ``full`` ((doc, q) -> row)."""
    docs = [r["doc"] for r in rs]
    fr = [full[(r["doc"], r["q"])] for r in rs]
    d, lo, hi = _boot_diff(docs, np.array([r["nll"] - f["nll"] for r, f in zip(rs, fr)], float))
    tok = _boot(docs, np.array([r["tok_acc"] for r in rs], float), np.array([f["tok_acc"] for f in fr], float))
    return {"dnll": d, "dnll_lo": lo, "dnll_hi": hi, "tok_acc": tok["acc"], "tok_full": tok["full"],
            "tok_ret": tok["retention"], "tok_ret_lo": tok["ret_lo"], "tok_ret_hi": tok["ret_hi"]}


def aggregate(rows: list[dict]) -> dict:
    """{"overall": [...], "by": {"task"|"shape"|"depth": [...]}}: one entry per method x budget (x group)."""
    full_rows = {(r["doc"], r["q"]): r for r in rows if r["method"] == "full"}
    full = {k: r["score"] for k, r in full_rows.items()}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["budget"])].append(r)
    out = {"overall": [], "by": {"task": [], "shape": [], "depth": []}}
    for (method, budget), rs in groups.items():
        def one(sub: list[dict]) -> dict:
            return _boot([r["doc"] for r in sub], np.array([r["score"] for r in sub], float),
                         np.array([full[(r["doc"], r["q"])] for r in sub], float))
        base = {"method": method, "budget": budget, "cells": float(np.mean([r["cells"] for r in rs])),
                "tokens": float(np.mean([r["tokens"] for r in rs])),
                "t_compact": float(np.mean([r["t_compact"] for r in rs]))}
        tf = all("nll" in r for r in rs) and all("nll" in full_rows[(r["doc"], r["q"])] for r in rs)
        if tf:
            base.update(_teacher_forced(rs, full_rows))
        out["overall"].append({**base, **one(rs)})
        for key, fn in (("task", lambda r: r["task"]), ("shape", lambda r: r["shape"]),
                        ("depth", lambda r: _depth_bin(r.get("depth")))):
            sub: dict[str, list[dict]] = defaultdict(list)
            for r in rs:
                sub[fn(r)].append(r)
            for g, srs in sorted(sub.items()):
                out["by"][key].append({"method": method, "budget": budget, key: g, **one(srs),
                                       **(_teacher_forced(srs, full_rows) if tf else {})})
    return out


def _pct(x: float) -> str:
    return "—" if not np.isfinite(x) else f"{100 * x:.0f}"


def _breakdown(rows: list[dict], key: str, ratio: str, level: str, title: str) -> list[str]:
    """Markdown lines: one row per configuration, one column per group of ``key``; the full cache shows
    ``level`` (its accuracy), the methods ``ratio`` (their retention)."""
    cols = sorted({r[key] for r in rows})
    lines = ["", f"## {title}", "", "| method | budget | " + " | ".join(cols) + " |",
             "| --- | --- |" + " --- |" * len(cols)]
    cell = {(r["method"], r["budget"], r[key]): r for r in rows}
    confs = sorted({(r["method"], r["budget"]) for r in rows}, key=lambda c: (c[0] != "full", -c[1], c[0]))
    for m, b in confs:
        vals = []
        for c in cols:
            r = cell.get((m, b, c))
            vals.append("" if r is None else _pct(r[level] if m == "full" else r[ratio]))
        lines.append(f"| {m} | {b:g} | " + " | ".join(vals) + " |")
    return lines


def markdown(agg: dict, meta: dict, ppl: list[dict] | None = None) -> str:
    """The report: overall table (accuracy and retention with intervals), retention per group, then the
    natural-text perplexity rows (``ppl``: :func:`kvmerge_local.quality.perplexity.run` rows) if given."""
    lines = [f"# Real-model suite: {meta.get('model', '')}", "",
             ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "model"), "",
             *(["Budgets are memory budgets: the fraction of the bytes the f16 full cache takes. METHOD@TYPES is "
                "the method on the cache types the plan picked (quantize first, evict the rest; a plan that keeps "
                "every cell runs only full@TYPES). Retention is against the f16 full cache.", ""]
               if meta.get("budget_unit") == "memory" else []),
             "| method | budget | acc % (95% CI) | retention % (95% CI) | questions | docs | cells | compact s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(agg["overall"], key=lambda r: (-r["budget"], -r["acc"])):
        lines.append(f"| {r['method']} | {r['budget']:g} | {_pct(r['acc'])} ({_pct(r['acc_lo'])}–{_pct(r['acc_hi'])}) "
                     f"| {_pct(r['retention'])} ({_pct(r['ret_lo'])}–{_pct(r['ret_hi'])}) | {r['n']} | {r['n_docs']} "
                     f"| {r['cells']:.0f} / {r['tokens']:.0f} | {r['t_compact']:.2f} |")
    tf = [r for r in agg["overall"] if "dnll" in r]
    if tf:
        lines += ["", "## Teacher-forced gold answer (every question counts)", "",
                  "dNLL: the gold answer's NLL per token with the method minus with the full cache (nats; 0 = as the "
                  "full cache); token acc: answer tokens that are the argmax.", "",
                  "| method | budget | dNLL (95% CI) | token acc % | token retention % (95% CI) |",
                  "| --- | --- | --- | --- | --- |"]
        for r in sorted(tf, key=lambda r: (-r["budget"], r["dnll"])):
            lines.append(f"| {r['method']} | {r['budget']:g} | {r['dnll']:.3f} ({r['dnll_lo']:.3f}–{r['dnll_hi']:.3f}) "
                         f"| {_pct(r['tok_acc'])} | {_pct(r['tok_ret'])} ({_pct(r['tok_ret_lo'])}–{_pct(r['tok_ret_hi'])}) |")
    for key in ("task", "shape", "depth"):
        lines += _breakdown(agg["by"][key], key, "retention", "acc",
                            f"Retention by {key} (full-cache accuracy in the first row)")
        if any("tok_ret" in r for r in agg["by"][key]):
            lines += _breakdown(agg["by"][key], key, "tok_ret", "tok_acc",
                                f"Token retention by {key} (full-cache token accuracy in the first row)")
    if ppl:
        full = next((r["ppl"] for r in ppl if r["method"] == "full"), None)
        lines += ["", "## Natural-text perplexity of a continuation after a compressed prefix", "",
                  f"{ppl[0]['n_texts']} held-out texts, {ppl[0]['tokens']} scored continuation tokens per row.", "",
                  "| method | budget | perplexity | ÷ full |", "| --- | --- | --- | --- |"]
        for r in sorted(ppl, key=lambda r: (r["method"] != "full", -r["budget"], r["ppl"])):
            ratio = f"{r['ppl'] / full:.3f}" if full else ""
            lines.append(f"| {r['method']} | {r['budget']:g} | {r['ppl']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


XLABEL = {"cells": "budget (fraction of the document's cells kept)",
          "memory": "memory budget (fraction of the f16 full cache's bytes)"}


def _finish(plt, fig, ax, ref: float, ylabel: str, path: Path, unit: str = "cells") -> Path:
    """Reference line at ``ref``, labels, legend; save ``fig`` to ``path`` and close it."""
    ax.axhline(ref, color="k", lw=0.8, ls="--")
    ax.set_xlabel(XLABEL[unit])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(agg: dict, out: Path, unit: str = "cells") -> list[Path]:
    """retention_vs_budget.png and, with teacher-forced rows, answer_nll_vs_budget.png (matplotlib, Agg)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_m: dict[str, list[dict]] = defaultdict(list)
    for r in agg["overall"]:
        if r["method"] != "full":
            by_m[r["method"]].append(r)
    for m, rs in sorted(by_m.items()):
        rs.sort(key=lambda r: r["budget"])
        x = [r["budget"] for r in rs]
        y = [100 * r["retention"] for r in rs]
        lo = [100 * r["ret_lo"] for r in rs]
        hi = [100 * r["ret_hi"] for r in rs]
        ax.plot(x, y, marker="o", label=m)
        ax.fill_between(x, lo, hi, alpha=0.12)
    paths.append(_finish(plt, fig, ax, 100, "retention of full-cache accuracy, %", out / "retention_vs_budget.png",
                         unit))
    if any("dnll" in r for r in agg["overall"]):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, rs in sorted(by_m.items()):
            rs = [r for r in rs if "dnll" in r]
            if rs:
                ax.errorbar([r["budget"] for r in rs], [r["dnll"] for r in rs], marker="o", label=m, capsize=3,
                            yerr=[[r["dnll"] - r["dnll_lo"] for r in rs], [r["dnll_hi"] - r["dnll"] for r in rs]])
        paths.append(_finish(plt, fig, ax, 0, "gold answer NLL - full cache's (nats/token)",
                             out / "answer_nll_vs_budget.png", unit))
    return paths


def write(out: str | Path, rows: list[dict], meta: dict, ppl: list[dict] | None = None) -> dict:
    """DIR/results.json (rows, aggregates, meta, perplexity rows), DIR/results.md and the PNGs; returns their
    paths."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    pj = d / "results.json"
    pj.write_text(json.dumps({"meta": meta, "aggregate": agg, "rows": rows, "perplexity": ppl or []}, indent=1,
                             default=str))
    pm = d / "results.md"
    pm.write_text(markdown(agg, meta, ppl))
    return {"json": pj, "md": pm, "plots": plots(agg, d, meta.get("budget_unit", "cells"))}


def show(paths: dict) -> int:
    """Print a written report and where its files are; returns 0 (the CLI's exit status)."""
    print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['md']}, " + ", ".join(str(p) for p in paths["plots"]))
    return 0
