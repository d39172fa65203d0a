"""Scoring variants tried with answer_nll.py (issue 12 exploration; the product's methods live in methods/)."""
import dataclasses

import numpy as np

from kvmerge_local.methods import KVzip
from kvmerge_local.methods.base import Selection


@dataclasses.dataclass
class KZStep1(KVzip):
    """KVzip with the exact max over single replay queries (step 1) instead of sums over 16."""
    evidence_kind = "reconstruct1"


@dataclasses.dataclass
class KZValue(KVzip):
    """KVzip score x the value's L2 norm (VATP-style)."""
    def select(self, keys, values, positions, evidence, m):
        self._vn = np.linalg.norm(values, axis=-1)
        return super().select(keys, values, positions, evidence, m)

    def scores(self, keys, positions, evidence, m):
        return evidence * self._vn


@dataclasses.dataclass
class KZChunk(KVzip):
    """ChunkKV-style: per (layer, head) the score of a token is its chunk's mean score (chunks of ``c``),
    so whole chunks are kept."""
    c: int = 8
    agg: str = "mean"

    def scores(self, keys, positions, evidence, m):
        L, H, N = evidence.shape
        pad = (-N) % self.c
        e = np.pad(evidence, ((0, 0), (0, 0), (0, pad)), mode="edge").reshape(L, H, -1, self.c)
        s = e.mean(-1) if self.agg == "mean" else e.max(-1)
        s = np.repeat(s, self.c, axis=-1)[..., :N]
        # tie-break inside a chunk by position (later first) so partial chunks are contiguous
        return (s + 1e-7 * np.arange(N, dtype=np.float32) / N).astype(np.float32)


@dataclasses.dataclass
class KZChunkShared(KZChunk):
    """Chunks ranked per layer (mean of per-head rank-normalised chunk scores): same cells in every head."""
    def scores(self, keys, positions, evidence, m):
        s = super().scores(keys, positions, evidence, m)
        r = np.argsort(np.argsort(s, axis=-1), axis=-1).astype(np.float32)
        return np.ascontiguousarray(r.mean(1, keepdims=True))


@dataclasses.dataclass
class KZRecent(KVzip):
    """KVzip with a recent window of ``frac`` of the budget."""
    frac: float = 0.125

    def recent(self, m):
        return max(1, int(self.frac * m))


@dataclasses.dataclass
class KZSoftmaxNorm(KVzip):
    """Per-(layer, head) scores divided by that head's mean score (heads that attend broadly count alike)."""
    def scores(self, keys, positions, evidence, m):
        return (evidence / np.maximum(evidence.mean(-1, keepdims=True), 1e-9)).astype(np.float32)


@dataclasses.dataclass
class QAware(Selection):
    """Query-aware oracle: top-k per (layer, head) by the question's attention, max-pooled over ``pool``
    neighbours each side, ``n_sink`` first and ``n_recent`` last cells kept."""
    n_sink: int = 4
    n_recent: int = 16
    pool: int = 0
    evidence_kind = "question"
    name = "qaware"

    def recent(self, m):
        return self.n_recent

    def scores(self, keys, positions, evidence, m):
        from numpy.lib.stride_tricks import sliding_window_view as swv
        e = evidence.astype(np.float32)
        if self.pool:
            p = np.pad(e, ((0, 0), (0, 0), (self.pool, self.pool)), mode="edge")
            e = swv(p, 2 * self.pool + 1, axis=-1).max(-1)
        return np.ascontiguousarray(e)


@dataclasses.dataclass
class QAwareTok(QAware):
    """Query-aware, one score per token (the mean over (layer, head) of per-head max-normalised attention):
    the same cells in every head."""
    def scores(self, keys, positions, evidence, m):
        e = evidence / np.maximum(evidence.max(-1, keepdims=True), 1e-9)
        return np.ascontiguousarray(e.mean((0, 1))[None, None].repeat(e.shape[0], 0), dtype=np.float32)


from kvmerge_local.methods import StreamingLLM  # noqa: E402
from kvmerge_local.methods.base import Method  # noqa: E402
from kvmerge_local.plan import Plan  # noqa: E402


def _csr(groups_per_lh, L, H, N, dup):
    """Plan from per-(l, h) lists of source groups (ascending); ``dup``: every member slot of a group holds
    the group's mean (m = N: proportional attention simulated by duplication), else one slot per group."""
    offs, src, w, pos = [], [], [], []
    n = 0
    for l in range(L):
        for h in range(H):
            o, p = [], []
            for g in groups_per_lh[l][h]:
                reps = g if dup else [g[-1]]
                for j in reps:
                    o.append(n)
                    src.extend(g)
                    w.extend([1.0 / len(g)] * len(g))
                    n += len(g)
                    p.append(j)
            o.append(n)
            offs.append(o)
            pos.append(p)
    m = len(pos[0])
    offsets = np.array([o for o in offs], np.int64).reshape(L, H, m + 1)
    wk = np.array(w, np.float32)
    return Plan(N, offsets, np.array(src, np.int32), wk, wk.copy(), np.array(pos, np.int32).reshape(L, H, m))


@dataclasses.dataclass
class ChunkMerge(Method):
    """Token-level chunks of ``c`` merged into one cell (mean key and value); with ``pa`` every member keeps a
    copy of the mean (m = N), which is exactly proportional attention (bias log c) -- a simulation, no saving.
    ``keep_top``: with KVzip evidence, that fraction of the budget's cells stay singletons per head."""
    c: int = 2
    pa: bool = False
    n_sink: int = 4
    n_recent: int = 8
    name = "chunkmerge"
    evidence_kind = "none"
    needs_evidence = False

    def _plan(self, keys, values, positions, evidence, m):
        L, H, N, _ = keys.shape
        groups = [list(range(i, i + 1)) for i in range(self.n_sink)]
        body = range(self.n_sink, N - self.n_recent)
        b = list(body)
        groups += [b[i:i + self.c] for i in range(0, len(b), self.c)]
        groups += [[i] for i in range(N - self.n_recent, N)]
        return _csr([[groups] * H] * L, L, H, N, self.pa)


@dataclasses.dataclass
class KZRunMerge(KVzip):
    """KVzip keeps its top cells per head; each run of evicted cells between two kept ones becomes one merged
    cell (mean), with ``pa`` simulated by duplication (m = N).  Without pa the cell count is kept + runs."""
    pa: bool = True

    def _plan(self, keys, values, positions, evidence, m):
        L, H, N, _ = keys.shape
        idx = self.select(keys, values, positions, evidence, m)
        per = []
        for l in range(L):
            row = []
            for h in range(H):
                kept = set(idx[l, h].tolist())
                gs, run = [], []
                for i in range(N):
                    if i in kept:
                        if run:
                            gs.append(run)
                            run = []
                        gs.append([i])
                    else:
                        run.append(i)
                if run:
                    gs.append(run)
                row.append(gs)
            per.append(row)
        return _csr(per, L, H, N, self.pa)

VARIANTS = {
    "kzr25": lambda: KZRecent(frac=0.25),
    "kzr50": lambda: KZRecent(frac=0.5),
    "cm2": lambda: ChunkMerge(c=2),
    "cm2pa": lambda: ChunkMerge(c=2, pa=True),
    "cm4": lambda: ChunkMerge(c=4),
    "cm4pa": lambda: ChunkMerge(c=4, pa=True),
    "kzrm_pa": KZRunMerge,
    "kz_s24": lambda: KVzip(n_sink=24),
    "kz_s24r16": lambda: KVzip(n_sink=24, n_recent=16),
    "st_s24": lambda: StreamingLLM(n_sink=24),
    "qaware_s24": lambda: QAware(n_sink=24),
    "qtok": QAwareTok,
    "native_qtok": QAwareTok,
    "qaware": QAware,
    "qaware_p2": lambda: QAware(pool=2),
    "qaware_p4": lambda: QAware(pool=4),
    "kz1": KZStep1,
    "kzv": KZValue,
    "kzc4": lambda: KZChunk(c=4),
    "kzc8": lambda: KZChunk(c=8),
    "kzc16": lambda: KZChunk(c=16),
    "kzc8max": lambda: KZChunk(c=8, agg="max"),
    "kzc8s": lambda: KZChunkShared(c=8),
    "kzr": KZRecent,
    "kz1c8": lambda: _k1c(8),
}


def _k1c(c):
    @dataclasses.dataclass
    class K(KZChunk):
        evidence_kind = "reconstruct1"
    return K(c=c)
