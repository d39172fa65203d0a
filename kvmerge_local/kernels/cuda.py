"""``numba.cuda`` twins of the hot kernels: apply plan, adjacent cosine and the Gaussian merge weights.

Each public function runs on the GPU when ``numba.cuda`` finds one (or under the simulator,
``NUMBA_ENABLE_CUDASIM=1``, used by the tests) and otherwise falls back to the CPU Numba kernel with the
same result, logging once.  Host arrays are made contiguous and copied to the device; float16 is loaded
natively and converted by the hardware (round-half-to-even, as NumPy; NaN payloads may differ).  Copy
slots move raw elements; merges accumulate in float32 and saturate to the finite f16 range.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..plan import Plan

log = logging.getLogger(__name__)

try:  # numba.cuda imports without a GPU; kernels compile lazily at first launch
    from numba import cuda, float32, float64
except ImportError:  # pragma: no cover - numba always ships cuda
    cuda = None

_warned = False


def cuda_available() -> bool:
    """True when a CUDA device (or the simulator) can run the twins."""
    try:
        return cuda is not None and bool(cuda.is_available())
    except Exception:  # pragma: no cover - broken driver setups
        return False


def _fallback(what: str) -> None:
    global _warned
    if not _warned:
        log.info("no CUDA device: %s runs on the CPU kernels", what)
        _warned = True


if cuda is not None:

    @cuda.jit
    def _apply_kernel(src, dst, offsets, psrc, w, hi):
        """Block = one (l, h, slot); thread = one element of head_dim."""
        H, m = dst.shape[1], dst.shape[2]
        slot = cuda.blockIdx.x
        e = cuda.threadIdx.x
        if e >= dst.shape[3]:
            return
        l = slot // (H * m)
        h = (slot // m) % H
        j = slot % m
        a, b = offsets[l, h, j], offsets[l, h, j + 1]
        nz = 0
        one = -1
        for t in range(a, b):
            if w[t] != 0.0:
                nz += 1
                one = t
        if nz == 1 and w[one] == 1.0:
            dst[l, h, j, e] = src[l, h, psrc[one], e]
            return
        acc = float32(0.0)
        for t in range(a, b):
            if w[t] != 0.0:
                acc += w[t] * float32(src[l, h, psrc[t], e])
        if acc > hi:
            acc = hi
        elif acc < -hi:
            acc = -hi
        dst[l, h, j, e] = acc

    @cuda.jit
    def _adjcos_kernel(keys, out):
        """Thread = one (l, h, i): cos(k_i, k_{i+1}) in float64."""
        H, N, d = keys.shape[1], keys.shape[2], keys.shape[3]
        idx = cuda.grid(1)
        if idx >= keys.shape[0] * H * (N - 1):
            return
        l = idx // (H * (N - 1))
        h = (idx // (N - 1)) % H
        i = idx % (N - 1)
        dot = float64(0.0)
        na = float64(0.0)
        nb = float64(0.0)
        for e in range(d):
            x = float64(float32(keys[l, h, i, e]))
            y = float64(float32(keys[l, h, i + 1, e]))
            dot += x * y
            na += x * x
            nb += y * y
        out[l, h, i] = dot / math.sqrt(na * nb) if na > 0.0 and nb > 0.0 else 0.0

    @cuda.jit
    def _gauss_kernel(keys, evidence, positions, start, end, sigma, use_rms, size_scale, offsets, src, wk, wv, pos):
        """Thread = one (l, h, slot): pivot, Gaussian weights and position of the run start:end."""
        H, m = start.shape[1], start.shape[2]
        d = keys.shape[3]
        idx = cuda.grid(1)
        if idx >= start.shape[0] * H * m:
            return
        l = idx // (H * m)
        h = (idx // m) % H
        j = idx % m
        a, b = start[l, h, j], end[l, h, j]
        o = offsets[l, h, j]
        piv = a
        for i in range(a + 1, b):
            if evidence[l, h, i] >= evidence[l, h, piv]:
                piv = i
        pos[l, h, j] = positions[l, h, piv]
        if b - a == 1:
            src[o] = a
            wk[o] = 1.0
            wv[o] = 1.0
            return
        tot = float64(0.0)
        for i in range(a, b):
            s = float64(0.0)
            for e in range(d):
                x = float64(float32(keys[l, h, piv, e])) - float64(float32(keys[l, h, i, e]))
                s += x * x
            wk[o + i - a] = s  # squared distance, turned into a weight below
            tot += s
        n = b - a
        s2 = tot / n if use_rms else sigma * sigma
        gsum = float64(0.0)
        for t in range(n):
            g = math.exp(-float64(wk[o + t]) / (2.0 * s2)) if s2 > 0.0 else 1.0
            wv[o + t] = g
            gsum += g
        scale = float64(n) if size_scale else 1.0
        for t in range(n):
            w = float64(wv[o + t]) / gsum
            src[o + t] = a + t
            wk[o + t] = w
            wv[o + t] = w * scale


def apply_plan_cuda(src: np.ndarray, dst: np.ndarray, plan: Plan, which: str = "k") -> np.ndarray:
    """GPU twin of :func:`kvmerge_local.kernels.apply.apply_plan` (same arguments, fills host ``dst``)."""
    from .apply import _check, apply_plan

    if which not in ("k", "v"):
        raise ValueError(f"which must be 'k' or 'v', got {which!r}")
    _check(src, dst, plan)
    if not cuda_available():
        _fallback("apply_plan")
        return apply_plan(src, dst, plan, which)
    if src.dtype not in (np.float16, np.float32):
        raise ValueError(f"src must be float16 or float32, got {src.dtype}")
    L, H, m, d = dst.shape
    if dst.size == 0:
        return dst
    d_src = cuda.to_device(np.ascontiguousarray(src))
    d_dst = cuda.device_array(dst.shape, dst.dtype)
    hi = np.float32(65504.0 if src.dtype == np.float16 else np.finfo(np.float32).max)
    _apply_kernel[L * H * m, d](d_src, d_dst, cuda.to_device(plan.offsets), cuda.to_device(plan.src),
                                cuda.to_device(plan.wk if which == "k" else plan.wv), hi)
    dst[...] = d_dst.copy_to_host()
    return dst


def adjacent_cosine_cuda(keys: np.ndarray) -> np.ndarray:
    """GPU twin of :func:`kvmerge_local.kernels.similarity.adjacent_cosine`: float32[L, H, N-1]."""
    from .similarity import adjacent_cosine

    if not cuda_available():
        _fallback("adjacent_cosine")
        return adjacent_cosine(keys)
    L, H, N, _ = keys.shape
    out = cuda.device_array((L, H, max(N - 1, 0)), np.float32)
    total = L * H * max(N - 1, 0)
    if total:
        _adjcos_kernel[(total + 127) // 128, 128](cuda.to_device(np.ascontiguousarray(keys)), out)
    return out.copy_to_host()


def gaussian_runs_cuda(keys, evidence, positions, start, end, sigma, use_rms, size_scale):
    """GPU twin of :func:`kvmerge_local.kernels.merge.gaussian_runs_fill` returning a :class:`Plan`.

    keys float16/float32 [L, H, N, d]; evidence float32[L, H, N]; positions int32[L, H, N];
    start/end int32[L, H, m] runs; sigma float (ignored when use_rms).
    """
    from .merge import csr_offsets, gaussian_runs_fill
    from .strided import flat_view

    offsets = csr_offsets(end - start)
    nnz = int(offsets[-1, -1, -1])
    src = np.empty(nnz, np.int32)
    wk = np.empty(nnz, np.float32)
    wv = np.empty(nnz, np.float32)
    pos = np.empty(start.shape, np.int32)
    if not cuda_available():
        _fallback("gaussian merge")
        gaussian_runs_fill(*flat_view(keys, "keys"), evidence, positions, start, end, float(sigma), bool(use_rms),
                           bool(size_scale), offsets, src, wk, wv, pos)
    else:
        L, H, m = start.shape
        d_src, d_wk, d_wv, d_pos = (cuda.device_array_like(x) for x in (src, wk, wv, pos))
        n = L * H * m
        _gauss_kernel[(n + 127) // 128, 128](
            cuda.to_device(np.ascontiguousarray(keys)), cuda.to_device(np.ascontiguousarray(evidence)),
            cuda.to_device(np.ascontiguousarray(positions)), cuda.to_device(start), cuda.to_device(end),
            float(sigma), bool(use_rms), bool(size_scale), cuda.to_device(offsets), d_src, d_wk, d_wv, d_pos)
        src, wk, wv, pos = (x.copy_to_host() for x in (d_src, d_wk, d_wv, d_pos))
    return Plan(n_in=keys.shape[2], offsets=offsets, src=src, wk=wk, wv=wv, pos=pos)
