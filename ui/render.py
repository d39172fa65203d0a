"""HTML for the live gauge, an SVG plot of kept tokens over the document, and page citations.

Pure functions of plain data (a stats dict, NumPy arrays, page tuples): no Gradio, no engine.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

import numpy as np

MB = 1024 * 1024


@dataclass(frozen=True)
class Coverage:
    """Where the cache holds evidence of the document.

    ``edges``: int64[n_bins + 1] token positions bounding the bins; ``share``: float64[n_bins], the fraction of
    (position, layer, KV head) slots of each bin held by some cache cell; ``page_share``: page number → the
    same fraction over that page; ``n_heads``: layers × KV heads averaged over.
    """

    edges: np.ndarray
    share: np.ndarray
    page_share: dict[int, float]
    n_heads: int

    @property
    def mean(self) -> float:
        widths = np.diff(self.edges)
        return float((self.share * widths).sum() / max(1, widths.sum()))


def coverage(kept: np.ndarray, n_tokens: int, pages: list[tuple[int, int, int]], n_bins: int = 96) -> Coverage | None:
    """Coverage of ``n_tokens`` document tokens by ``kept`` (int[n_layer, n_kv_head, cells] positions).

    Positions outside ``[0, n_tokens)`` (empty cells, chat tokens after the document) are ignored.
    None when there is nothing to show.
    """
    kept = np.asarray(kept)
    if n_tokens <= 0 or kept.ndim != 3 or kept.shape[0] * kept.shape[1] == 0:
        return None
    n_heads = kept.shape[0] * kept.shape[1]
    pos = kept.reshape(-1).astype(np.int64)
    pos = pos[(pos >= 0) & (pos < n_tokens)]
    counts = np.bincount(pos, minlength=n_tokens)[:n_tokens]
    n_bins = max(1, min(n_bins, n_tokens))
    edges = np.linspace(0, n_tokens, n_bins + 1).round().astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(counts)])
    held = csum[edges[1:]] - csum[edges[:-1]]
    widths = np.maximum(1, np.diff(edges))
    share = np.minimum(1.0, held / (widths * n_heads))
    page_share = {}
    for page, first, last in pages:
        lo, hi = max(0, int(first)), min(n_tokens, int(last) + 1)
        if hi > lo:
            page_share[int(page)] = min(1.0, float(csum[hi] - csum[lo]) / ((hi - lo) * n_heads))
    return Coverage(edges=edges, share=share, page_share=page_share, n_heads=n_heads)


# ---------------------------------------------------------------------------------------------------- gauge
def _num(stats: dict, key: str, default=None):
    v = stats.get(key, default)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else default


def _bar(frac: float, color: str) -> str:
    pct = max(0.0, min(100.0, 100.0 * frac))
    return (f'<div class="kvm-bar"><div style="width:{pct:.1f}%;background:{color}"></div></div>')


def _card(title: str, value: str, sub: str = "", extra: str = "") -> str:
    return (f'<div class="kvm-card"><div class="kvm-title">{html.escape(title)}</div>'
            f'<div class="kvm-value">{value}</div>{extra}'
            f'<div class="kvm-sub">{sub}</div></div>')


def _secs(t: float | None) -> str:
    if t is None:
        return "–"
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.1f} s"


def gauge_html(stats: dict | None, *, doc_name: str | None = None, n_pages: int = 0) -> str:
    """The gauge: document tokens, cells in use of n_ctx, KV MB now vs the full f16 cache (``kv_bytes_f16``; the
    full cache of the session's own types for stats that lack it), ratio, prefill/compaction time."""
    if not stats or not _num(stats, "tokens_ingested"):
        return ('<div class="kvm-gauge kvm-empty">No document yet — drop a PDF, TXT or MD file on the left; '
                'it is ingested right away.</div>')
    tokens = int(_num(stats, "tokens_ingested", 0))
    cells = _num(stats, "cells_in_use")
    n_ctx = _num(stats, "n_ctx")
    full = _num(stats, "kv_bytes_f16") or _num(stats, "kv_bytes_full")  # the reference: every token, in f16
    now = _num(stats, "kv_bytes_now")
    cards = []
    title = html.escape(doc_name) if doc_name else "Document"
    pages = f" · {n_pages} page{'s' if n_pages != 1 else ''}" if n_pages else ""
    cards.append(_card("Document", f"{tokens:,}", f"tokens{pages}<br><span class='kvm-doc'>{title}</span>"))
    if cells is not None and n_ctx:
        cards.append(_card("Cache cells", f"{int(cells):,} <small>/ {int(n_ctx):,}</small>",
                           f"{cells / n_ctx:.0%} of the context in use", _bar(cells / n_ctx, "#2563eb")))
    if full and now is not None:
        extra = _bar(1.0, "#9ca3af") + _bar(now / full, "#16a34a")
        cards.append(_card("KV memory", f"{now / MB:,.1f} MB",
                           f"now, vs {full / MB:,.1f} MB for the full f16 cache", extra))
    ratio = (full / now) if (full and now) else None
    if ratio is None and _num(stats, "ratio"):  # Stats.ratio is now / full (of the same cache types)
        ratio = 1.0 / stats["ratio"]
    if ratio:
        kept = f"{1 / ratio:.0%} of the full cache's memory" if ratio >= 1 else ""
        cards.append(_card("Compression", f"{ratio:.1f}×", kept))
    t_pre, t_cmp, t_dec = _num(stats, "t_prefill"), _num(stats, "t_compact"), _num(stats, "t_decode")
    times = f"prefill {_secs(t_pre)}<br>compaction {_secs(t_cmp)}"
    if t_dec:
        times += f"<br>last answer {_secs(t_dec)}"
    method, budget = stats.get("method"), _num(stats, "budget")
    label = f"{html.escape(str(method))}" + (f" @ {budget:.0%}" if budget is not None and budget <= 1 else
                                              f" @ {budget:g} cells" if budget else "")
    cards.append(_card("Time", _secs(t_pre + (t_cmp or 0.0)) if t_pre is not None else "–", times))
    if method:
        cards.append(_card("Method", label, html.escape(str(stats.get("kv_type", "")))))
    return f'<div class="kvm-gauge">{"".join(cards)}</div>'


# ----------------------------------------------------------------------------------------------------- plot
def _nice_max(v: float) -> float:
    for m in (0.05, 0.1, 0.2, 0.25, 0.5, 0.75, 1.0):
        if v <= m + 1e-9:
            return m
    return 1.0


def plot_html(cov: Coverage | None, pages: list[tuple[int, int, int]], cited: set[int] | None = None,
              width: int = 640, height: int = 200) -> str:
    """An inline SVG bar plot of :class:`Coverage` with page boundaries marked (cited pages shaded)."""
    if cov is None:
        return ('<div class="kvm-plot kvm-empty">The plot of kept tokens over the document appears after '
                'ingestion.</div>')
    cited = cited or set()
    ml, mr, mt, mb = 44, 10, 22, 34
    pw, ph = width - ml - mr, height - mt - mb
    n_tokens = int(cov.edges[-1])
    ymax = _nice_max(float(cov.share.max()) if cov.share.size else 1.0)

    def x(tok: float) -> float:
        return ml + pw * tok / max(1, n_tokens)

    def y(frac: float) -> float:
        return mt + ph * (1 - min(frac, ymax) / ymax)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="kept tokens over the document" xmlns="http://www.w3.org/2000/svg" '
             f'style="font-family:sans-serif;font-size:10px">']
    for page, first, last in pages:
        if page in cited:
            parts.append(f'<rect x="{x(first):.1f}" y="{mt}" width="{max(1.0, x(last + 1) - x(first)):.1f}" '
                         f'height="{ph}" fill="#fde68a" opacity="0.7"><title>cited: page {page}</title></rect>')
    for i, s in enumerate(cov.share):
        x0, x1 = x(cov.edges[i]), x(cov.edges[i + 1])
        parts.append(f'<rect x="{x0:.1f}" y="{y(s):.1f}" width="{max(0.5, x1 - x0 - 0.4):.1f}" '
                     f'height="{mt + ph - y(s):.1f}" fill="#0d9488"><title>tokens {cov.edges[i]}–'
                     f'{cov.edges[i + 1] - 1}: {s:.0%} kept</title></rect>')
    mean_y = y(cov.mean)
    parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mean_y:.1f}" y2="{mean_y:.1f}" stroke="#6b7280" '
                 f'stroke-dasharray="4 3"/><text x="{ml + pw - 2}" y="{mean_y - 3:.1f}" text-anchor="end" '
                 f'fill="#111827" stroke="#ffffff" stroke-width="3" paint-order="stroke">mean {cov.mean:.0%}'
                 f'</text>')
    step = max(1, math.ceil(len(pages) / 16))
    for i, (page, first, last) in enumerate(pages):
        if i > 0:
            parts.append(f'<line x1="{x(first):.1f}" x2="{x(first):.1f}" y1="{mt}" y2="{mt + ph}" '
                         f'stroke="#9ca3af" stroke-width="0.8" stroke-dasharray="2 2"/>')
        if i % step == 0 or page in cited:
            mid = (x(first) + x(last + 1)) / 2
            weight = ' font-weight="bold"' if page in cited else ""
            parts.append(f'<text x="{mid:.1f}" y="{mt - 6}" text-anchor="middle" fill="#374151"{weight}>'
                         f'p{page}</text>')
    parts.append(f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + ph}" stroke="#374151"/>'
                 f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#374151"/>')
    for frac in (0.0, ymax / 2, ymax):
        parts.append(f'<text x="{ml - 4}" y="{y(frac) + 3:.1f}" text-anchor="end" fill="#374151">'
                     f'{frac:.0%}</text>')
    parts.append(f'<text x="{ml}" y="{height - 18}" fill="#374151">0</text>'
                 f'<text x="{ml + pw}" y="{height - 18}" text-anchor="end" fill="#374151">{n_tokens:,}</text>'
                 f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="#374151">'
                 f'position in the document (tokens)</text></svg>')
    caption = (f'Share of each stretch of the document still held by the cache (averaged over {cov.n_heads} '
               f'layer × KV-head caches; a merged cell counts at the position it keeps).')
    return f'<div class="kvm-plot">{"".join(parts)}<div class="kvm-sub">{caption}</div></div>'


# ------------------------------------------------------------------------------------------------ citations
_PAGE_REF = re.compile(r"\b(?:pages?|pp?\.)\s*(\d{1,5})(?:\s*([-–]|and|&|,)\s*(\d{1,5}))?", re.IGNORECASE)


def cited_pages(text: str, pages: list[tuple[int, int, int]]) -> list[int]:
    """Page numbers the text refers to ("page 3", "p. 3", "pp. 3–4", "pages 2 and 5") that the document has."""
    have = {int(p) for p, _, _ in pages}
    found: list[int] = []
    for m in _PAGE_REF.finditer(text):
        a = int(m.group(1))
        b = int(m.group(3)) if m.group(3) else a
        rng = range(a, b + 1) if m.group(2) in ("-", "–") and a <= b <= a + 20 else (a, b)
        for p in rng:
            if p in have and p not in found:
                found.append(p)
    return found


def citations_markdown(cited: list[int], pages: list[tuple[int, int, int]], cov: Coverage | None) -> str:
    """One line per cited page: its token span and how much of it the cache still holds."""
    spans = {int(p): (int(a), int(b)) for p, a, b in pages}
    lines = []
    for p in cited:
        a, b = spans[p]
        held = f", {cov.page_share[p]:.0%} held in the cache" if cov and p in cov.page_share else ""
        lines.append(f"- page {p}: tokens {a:,}–{b:,}{held}")
    return "\n".join(lines)


CSS = """
.kvm-gauge { display: grid; grid-template-columns: repeat(auto-fit, minmax(128px, 1fr)); gap: 8px; }
.kvm-card { border: 1px solid var(--border-color-primary, #e5e7eb); border-radius: 8px; padding: 8px 10px;
            background: var(--background-fill-secondary, #f9fafb); }
.kvm-title { font-size: 0.75rem; text-transform: uppercase; letter-spacing: 0.04em; opacity: 0.7; }
.kvm-value { font-size: 1.35rem; font-weight: 600; margin: 2px 0; }
.kvm-value small { font-size: 0.8rem; font-weight: 400; opacity: 0.7; }
.kvm-sub { font-size: 0.78rem; opacity: 0.8; }
.kvm-doc { word-break: break-all; }
.kvm-bar { height: 6px; border-radius: 3px; background: rgba(127,127,127,0.2); margin: 3px 0; overflow: hidden; }
.kvm-bar > div { height: 100%; border-radius: 3px; }
.kvm-gauge.kvm-empty { min-height: 72px; display: flex; align-items: center; }
.kvm-empty { padding: 12px; opacity: 0.75; border: 1px dashed var(--border-color-primary, #d1d5db);
             border-radius: 8px; }
"""
