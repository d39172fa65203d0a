"""The Walsh-Hadamard rotation llama.cpp applies to quantized K/V caches (see kvmerge_local.codec for sources).

``rotate(x, nrot)`` is bit-identical to ggml's CPU ``ggml_compute_forward_fwht`` (what
``llama_mul_mat_hadamard`` runs on the CPU backend): per contiguous chunk c of nrot elements along the last axis,
``c := c * (1.f/sqrtf(nrot))`` then butterflies ``(u+v, u-v)`` for len = 1, 2, 4, ..., nrot/2. Mathematically
that is ``H @ c`` with H = :func:`hadamard_matrix` (symmetric, H @ H = I). :func:`unrotate` is the same
transform; in float32, ``unrotate(rotate(x)) == x + e`` with ``max|e| <= ~2.2 * eps32 * max|x|`` per row
(measured on Gaussian rows, nrot 64..1024; each output is log2(nrot) rounded additions plus one rounded
scaling) and about a quarter of the elements come back bit-exact. Scores are basis-free: q.k computed from
rotated q and rotated k equals the unrotated one up to the same rounding.
"""
from __future__ import annotations

import logging
import os

import numba as nb
import numpy as np

from .types import is_quantized

log = logging.getLogger(__name__)


def hadamard_matrix(n: int) -> np.ndarray:
    """float32[n, n] orthonormal Sylvester-Hadamard matrix, value-identical to llama.cpp's ggml_gen_hadamard.

    n: a power of two. Entry (i, j) is ``(-1)**popcount(i & j) * (float)(1.0 / sqrtf(n))``.
    """
    n = int(n)
    if n <= 0 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n}")
    h = np.zeros((n, n), np.float32)
    h[0, 0] = np.float32(1.0 / np.float64(np.sqrt(np.float32(n))))  # data[0] = 1.0 / sqrtf(n), double -> float
    s = 1
    while s < n:
        blk = h[:s, :s].copy()
        h[s:2 * s, :s] = blk
        h[:s, s:2 * s] = blk
        h[s:2 * s, s:2 * s] = -blk
        s *= 2
    return h


def rot_size(head_dim: int, kind: str = "k") -> int:
    """nrot llama.cpp uses for a head size (build_input_k_rot / build_input_v_rot); 0 if head_dim % 64 != 0.

    kind "k": the largest power of two >= 64 dividing head_dim; kind "v": 64.
    """
    head_dim = int(head_dim)
    if kind not in ("k", "v"):
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    if head_dim <= 0 or head_dim % 64:
        return 0
    if kind == "v":
        return 64
    nrot = 64
    while True:  # do { nrot *= 2; } while (n_embd_head_k_all % nrot == 0); nrot /= 2;
        nrot *= 2
        if head_dim % nrot:
            break
    return nrot // 2


def rotation_disabled_by_env(environ=None) -> bool:
    """True if LLAMA_ATTN_ROT_DISABLE is set to a non-zero integer (atoi semantics, as llama.cpp reads it)."""
    env = os.environ if environ is None else environ
    val = env.get("LLAMA_ATTN_ROT_DISABLE")
    if not val:
        return False
    digits = ""
    for ch in val.strip():
        if ch.isdigit() or (not digits and ch in "+-"):
            digits += ch
        else:
            break
    try:
        return int(digits) != 0
    except ValueError:
        return False


def cache_rot_size(type_id: int, head_dim: int, kind: str = "k", environ=None) -> int:
    """nrot with which a K ("k") or V ("v") cache of ggml type ``type_id`` is stored, 0 when it is not rotated.

    Rotated iff the type is quantized, head_dim % 64 == 0 and LLAMA_ATTN_ROT_DISABLE is unset/0 in the
    environment the llama context was created in (default: this process). Plain llama-style models only
    (llama.cpp always rotates some DeepSeek indexer caches).
    """
    if not is_quantized(type_id) or rotation_disabled_by_env(environ):
        return 0
    return rot_size(head_dim, kind)


@nb.njit(cache=True, parallel=True)
def _fwht_rows(x, nrot, out):
    scale = np.float32(1.0) / np.sqrt(np.float32(nrot))
    n_chunks = x.shape[1] // nrot
    for r in nb.prange(x.shape[0]):
        for c in range(n_chunks):
            o = c * nrot
            for j in range(nrot):
                out[r, o + j] = x[r, o + j] * scale
            ln = 1
            while ln < nrot:
                for i in range(0, nrot, 2 * ln):
                    for j in range(ln):
                        u = out[r, o + i + j]
                        v = out[r, o + i + ln + j]
                        out[r, o + i + j] = u + v
                        out[r, o + i + ln + j] = u - v
                ln *= 2


def rotate(x: np.ndarray, nrot: int, out: np.ndarray | None = None) -> np.ndarray:
    """Apply llama.cpp's KV Hadamard rotation to float32[..., n] rows (n % nrot == 0), chunk by chunk.

    x: float32[..., n]; nrot: power of two (see :func:`rot_size`); out: float32 of x's shape or None
    (allocated; ``out=x`` works in place). Returns out. Bit-identical to ggml CPU's fwht.
    """
    nrot = int(nrot)
    if nrot <= 0 or nrot & (nrot - 1):
        raise ValueError(f"nrot must be a power of two, got {nrot}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 1 or x.shape[-1] % nrot:
        raise ValueError(f"x must be float32[..., k*{nrot}]")
    if out is None:
        out = np.empty_like(x)
    elif out.shape != x.shape or out.dtype != np.float32:
        raise ValueError("out must be float32 with x's shape")
    x2 = x.reshape(-1, x.shape[-1])
    o2 = out.reshape(-1, x.shape[-1])
    if out.size and not np.shares_memory(o2, out):
        raise ValueError("out must be reshapable to 2-D without a copy")
    _fwht_rows(x2, nrot, o2)
    return out


def unrotate(x: np.ndarray, nrot: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`rotate` (the same transform, as H is symmetric and H @ H = I); shapes as rotate."""
    return rotate(x, nrot, out)
