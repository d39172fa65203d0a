"""RoPE of a model and the re-rotation of cached keys by a per-(layer, head, cell) position delta.

llama.cpp stores K **after** RoPE, so moving a cached key from position ``p`` to ``p + delta`` is one more
RoPE rotation by ``delta`` (rotations compose).  llama.cpp's own ``llama_memory_seq_add`` does this per
*cell*; after a per-head compaction each KV head may hold a different token (with a different RoPE
position) in the same cell, so :meth:`KVBridge.compact(reindex=True) <kvmerge_local.bridge.KVBridge.compact>`
re-rotates per head itself, here (kernel: :mod:`kvmerge_local.kernels.rope`), with the model's RoPE
parameters read from the GGUF metadata:

- ``<arch>.rope.freq_base`` (default 10000), ``<arch>.rope.dimension_count`` (``n_rot``, default head_dim:
  only the first ``n_rot`` dimensions rotate), ``<arch>.rope.scaling.type`` / ``.factor`` (``none`` and
  ``linear`` are supported: ``freq_scale = 1 / factor``; YaRN and LongRoPE are refused).
- rope type NORM (Llama: adjacent pairs ``(2i, 2i+1)``) or NEOX (pairs ``(i, i + n_rot/2)``).
- the tensor ``rope_freqs.weight`` (float32 ``[n_rot/2]``), present in Llama-3.1/3.2/3.3 GGUFs: per-pair
  frequency factors (Llama-3 RoPE scaling, baked in by the converter); llama.cpp divides pair ``i``'s angle
  by factor ``i`` in every RoPE, the K-shift included (``ggml_rope_cache_init``: ``rope_yarn(theta / ff, ...)``).

The angles are computed as ggml's ``ggml_rope_cache_init`` does (float32, ``theta`` multiplied by
``theta_scale = base^(-2/n_rot)`` pair after pair, divided by the pair's frequency factor, times
``freq_scale``), so the result matches llama.cpp's K-shift to within
one rounding of the stored type.  Quantized caches (q8_0, q4_0) are stored Hadamard-rotated: their keys
are dequantized, un-rotated, re-roped, rotated and requantized, as llama.cpp's shift graph does.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import UnsupportedCacheError

log = logging.getLogger(__name__)

ROPE_NORM, ROPE_NEOX = 0, 2
ROPE_FREQS_TENSOR = "rope_freqs.weight"


@lru_cache(maxsize=8)
def _rope_freqs_cached(path: str, size: int, mtime_ns: int) -> tuple[float, ...] | None:
    from gguf import GGUFReader  # noqa: PLC0415

    for t in GGUFReader(path).tensors:
        if t.name == ROPE_FREQS_TENSOR:
            if t.tensor_type.name not in ("F32", "F16"):
                raise UnsupportedCacheError(f"{Path(path).name}: {ROPE_FREQS_TENSOR} is stored as "
                                            f"{t.tensor_type.name} (expected F32); use position_policy='keep'")
            return tuple(float(x) for x in np.asarray(t.data, dtype=np.float32).reshape(-1))
    return None


def read_rope_freqs(path: str | os.PathLike) -> tuple[float, ...] | None:
    """The per-pair RoPE frequency factors of a GGUF (its ``rope_freqs.weight`` tensor), or None when it
    has none.  Cached per (path, size, mtime): reading a GGUF's header costs a moment on large vocabularies."""
    st = os.stat(path)
    return _rope_freqs_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class RopeParams:
    """RoPE of one model: ``n_rot`` rotated dims of ``head_dim``, ``freq_base``, ``freq_scale``, ``neox``, and
    ``freq_factors`` (``n_rot/2`` divisors of the pairs' angles, from ``rope_freqs.weight``; None = all 1)."""

    head_dim: int
    n_rot: int
    freq_base: float = 10000.0
    freq_scale: float = 1.0
    neox: bool = False
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int, got {self.head_dim}")
        if not 0 < self.n_rot <= self.head_dim or self.n_rot % 2:
            raise ValueError(f"n_rot must be even and in (0, head_dim={self.head_dim}], got {self.n_rot}")
        if not self.freq_base > 0 or not self.freq_scale > 0:
            raise ValueError("freq_base and freq_scale must be > 0")
        if self.freq_factors is not None:
            ff = np.asarray(self.freq_factors, dtype=np.float64)
            if ff.shape != (self.n_rot // 2,):
                raise ValueError(f"freq_factors must hold n_rot/2 = {self.n_rot // 2} values, got {ff.size}")
            if not np.all(np.isfinite(ff) & (ff > 0)):
                raise ValueError("freq_factors must be finite and > 0")

    @classmethod
    def from_model(cls, model) -> RopeParams:
        """Read the RoPE parameters of a :class:`~kvmerge_local.bridge.LlamaModel` from its GGUF metadata and,
        when the file has one, its ``rope_freqs.weight`` tensor."""
        arch = model.info["arch"]
        head_dim = model.geom.head_dim

        def num(key: str, default: float | None) -> float | None:
            v = model.meta(f"{arch}.{key}")
            return default if v is None else float(v)

        base = num("rope.freq_base", 10000.0)
        n_rot = int(num("rope.dimension_count", head_dim))
        scaling = (model.meta(f"{arch}.rope.scaling.type") or "none").strip().lower()
        factor = num("rope.scaling.factor", None) or num("rope.scale_linear", None)
        if scaling == "none" and factor not in (None, 0.0, 1.0) and model.meta(f"{arch}.rope.scale_linear"):
            scaling = "linear"
        if scaling == "none":
            scale = 1.0
        elif scaling == "linear":
            scale = 1.0 / factor if factor else 1.0
        else:
            raise UnsupportedCacheError(
                f"{model.path.name}: RoPE scaling '{scaling}' is not supported for re-indexing positions "
                "(supported: none, linear); use position_policy='keep'")
        neox = int(model.info["rope_type"]) == ROPE_NEOX
        path = Path(model.path)
        ff = read_rope_freqs(path) if path.is_file() else None  # (a stand-in model without a file: none)
        if ff is not None and len(ff) != n_rot // 2:
            raise UnsupportedCacheError(f"{path.name}: {ROPE_FREQS_TENSOR} holds {len(ff)} factors, expected "
                                        f"n_rot/2 = {n_rot // 2}; use position_policy='keep'")
        if ff is not None:
            log.debug("%s: RoPE frequency factors from %s (%.3g..%.3g)", path.name, ROPE_FREQS_TENSOR, min(ff), max(ff))
        return cls(head_dim=head_dim, n_rot=n_rot, freq_base=base, freq_scale=scale, neox=neox, freq_factors=ff)

    def angles(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin float32[*delta.shape, n_rot // 2] of the rotation by ``delta`` (int array), as ggml."""
        theta_scale = np.float32(np.power(np.float32(self.freq_base), np.float32(-2.0) / np.float32(self.n_rot),
                                          dtype=np.float32))
        fs = np.float32(self.freq_scale)
        ff = (np.ones(self.n_rot // 2, np.float32) if self.freq_factors is None
              else np.asarray(self.freq_factors, dtype=np.float32))
        t = np.asarray(delta, dtype=np.float32)
        theta = np.empty(t.shape + (self.n_rot // 2,), dtype=np.float32)
        for i in range(self.n_rot // 2):
            theta[..., i] = (t / ff[i]).astype(np.float32) * fs  # ggml: freq_scale * (theta / ff), float32
            t = (t * theta_scale).astype(np.float32)
        return np.cos(theta), np.sin(theta)

    def rotate(self, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Rotate float32 keys ``x[..., head_dim]`` in place by ``delta`` (int, shape ``x.shape[:-1]``)."""
        if x.dtype != np.float32 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must be float32[..., {self.head_dim}]")
        if np.shape(delta) != x.shape[:-1]:
            raise ValueError(f"delta shape {np.shape(delta)} != {x.shape[:-1]}")
        cos, sin = self.angles(delta)
        half = self.n_rot // 2
        if self.neox:
            i0, i1 = slice(0, half), slice(half, self.n_rot)
        else:
            i0, i1 = slice(0, self.n_rot, 2), slice(1, self.n_rot, 2)
        x0, x1 = x[..., i0].copy(), x[..., i1].copy()
        x[..., i0] = x0 * cos - x1 * sin
        x[..., i1] = x0 * sin + x1 * cos
        return x


def _shift(rope: RopeParams, k: np.ndarray, delta: np.ndarray) -> None:
    """Rotate ``k`` ([L, H, N, d] f16 (through its uint16 bits) or f32) in place by int ``delta[L, H, N]``.

    The angles are computed once per delta value in ``[min, max]`` (by :meth:`RopeParams.angles`, as ggml
    does); deltas are bounded by the context length, so the table is small."""
    idx, cos_t, sin_t = shift_tables(rope, delta)
    from ..kernels.rope import rotate_keys  # noqa: PLC0415 - Numba compiles on first use

    rotate_keys(k, idx, cos_t, sin_t, rope.neox)


def shift_tables(rope: RopeParams, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(idx, cos_t, sin_t)`` for rotating by int ``delta``: the angle tables of every delta value in
    ``[min, max]`` and, per entry, its row (int64, -1 where the delta is 0: left alone).  What
    :func:`_shift` and the CUDA re-rotation (``kernels.inplace_cuda.rerotate_inplace_cuda``) take."""
    lo, hi = int(delta.min()), int(delta.max())
    cos_t, sin_t = rope.angles(np.arange(lo, hi + 1))
    idx = delta.astype(np.int64) - lo
    idx[delta == 0] = -1
    return idx, cos_t, sin_t


def rerotate_state_keys(st, delta: np.ndarray, rope: RopeParams) -> int:
    """Re-rotate the keys of a :class:`~kvmerge_local.bridge.KVState` in place by ``delta``.

    ``delta``: int[n_layer, n_kv_head, n_cells] (new position - current RoPE position of each head's key);
    cells with delta 0 are left bit-identical.  f32 and f16 keys are rotated in place by a Numba kernel
    (float32 arithmetic, as ggml's in-place RoPE on the cache); bf16 and quantized (q8_0/q4_0, with the KV
    Hadamard rotation) keys are converted, rotated and converted back.  Returns the number of keys rotated.
    """
    from .. import codec  # noqa: PLC0415 - Numba compiles on first use

    L, H, N = st.geom.n_layer, st.geom.n_kv_head, st.n_cells
    delta = np.asarray(delta)
    if delta.shape != (L, H, N):
        raise ValueError(f"delta shape {delta.shape} != {(L, H, N)}")
    k4 = st.k4
    done = int(np.count_nonzero(delta))
    if k4.dtype in (np.float16, np.float32):
        _shift(rope, k4, delta)
        return done
    nrot = codec.cache_rot_size(st.k_type, st.geom.head_dim, "k")
    for l in range(L):
        hs, cs = np.nonzero(delta[l])
        if len(hs) == 0:
            continue
        dl = delta[l, hs, cs][None, None, :]
        if k4.dtype == np.uint16:  # bf16 bit patterns
            x = np.ascontiguousarray(codec.bf16_bits_to_f32_array(k4[l, hs, cs]))
            _shift(rope, x[None, None], dl)
            k4[l, hs, cs] = codec.f32_to_bf16_bits_array(x)
            continue
        x = codec.dequantize_rows(np.ascontiguousarray(k4[l, hs, cs]), st.k_type)
        if nrot:
            x = codec.unrotate(x, nrot)
        _shift(rope, x[None, None], dl)
        if nrot:
            x = codec.rotate(x, nrot)
        k4[l, hs, cs] = codec.quantize_rows(np.ascontiguousarray(x), st.k_type)
    log.debug("re-rotated %d keys", done)
    return done


def segment_shifts(old: np.ndarray, new: np.ndarray) -> list[tuple[int, int, int]]:
    """``(p0, p1, delta)`` calls of ``llama_memory_seq_add`` moving cells at ``old`` positions to ``new``.

    old, new: int[N], both strictly increasing and ``new <= old`` element-wise.  Consecutive cells with
    the same delta share one call.  Used to check the project's re-rotation against llama.cpp's.
    """
    old, new = np.asarray(old, np.int64), np.asarray(new, np.int64)
    if old.shape != new.shape or np.any(new > old):
        raise ValueError("new positions must not exceed old ones")
    out: list[tuple[int, int, int]] = []
    for p, q in zip(old.tolist(), new.tolist()):
        dlt = q - p
        if dlt == 0:
            continue
        if out and out[-1][2] == dlt and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1, dlt)
        else:
            out.append((p, p + 1, dlt))
    return out
