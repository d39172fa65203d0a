"""NumPy reference forward pass of the tiny LLAMA models, mirroring llama.cpp's CPU backend.

What is mirrored (``src/models/llama.cpp``, ``src/llama-graph.cpp``, ``ggml/src/ggml-cpu``):

- RMSNorm ``x / sqrt(mean(x**2) + eps) * w`` (mean in float64 like ggml), eps from the GGUF.
- RoPE in ``LLAMA_ROPE_TYPE_NORM`` mode: adjacent pairs ``(x[2i], x[2i+1])`` of each head are rotated by
  ``pos * base**(-2i/head_dim)``; the angles are built like ggml's ``rope_cache_init`` (float32 ``powf`` and a
  running float32 product). GGUF Q/K weights are used as stored (no HF permutation is involved: the tiny
  models are random in the GGUF layout already).
- GQA: query head ``h`` reads KV head ``h // (n_head // n_kv_head)``; scores scaled by ``1/sqrt(head_dim)``.
- The KV cache is f16: K (after RoPE) and V are rounded to float16 before attention reads them, including the
  current token's own entry (always).
- With ``ggml_rounding=True`` (the default), the other roundings of ggml's CPU backend: queries are rounded to
  f16 (``mul_mat(k_f16, q)`` and flash attention convert the f32 operand to the cache type), the softmax
  probabilities are rounded to f16 before ``P·V`` (non-flash path: ``mul_mat(v_f16, kq)``), and the f32 input
  of every matmul against an F16-stored weight is rounded to f16 (``vec_dot_type`` of F16 is F16).
- SwiGLU FFN: ``down(silu(gate(x)) * up(x))``; final RMSNorm and ``output`` (or tied ``token_embd``).
- The other tiny architectures (:mod:`kvmerge_local.tiny.arch`): Q/K/V biases added after the
  projections (``qwen2``), a per-head RMSNorm of Q and K before RoPE (``qwen3``), and NEOX RoPE (pairs
  ``(x[i], x[i + head_dim/2])``) for both.

Not mirrored: flash attention's online softmax (its one-query-at-a-time kernel accumulates ``P·V`` in f16;
tiled and split-KV kernels exist too), summation order, ggml's SIMD ``expf``. Measured agreement is in
``tests/test_reference_forward.py``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kvmerge_local.tiny.arch import ARCH_SPECS
from kvmerge_local.tiny.model import TinyLayer, TinyWeights

logger = logging.getLogger(__name__)


@dataclass
class RefOut:
    """Result of :func:`prefill`.

    ``logits`` float32 ``[T, n_vocab]``; ``k``, ``v`` float32 ``[n_layer, n_kv_head, T, head_dim]`` (K after
    RoPE; both f16-rounded as stored in llama.cpp's cache); ``q`` float32 ``[n_layer, n_head, T, head_dim]``
    (after RoPE, not rounded); ``positions`` int32 ``[T]``.
    """

    logits: np.ndarray
    k: np.ndarray
    v: np.ndarray
    q: np.ndarray
    positions: np.ndarray


def _f16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to float16 and back (ggml's f32->f16 conversion is round-to-nearest-even)."""
    return x.astype(np.float16).astype(np.float32)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm then ``* w``. ``x`` float32 ``[T, d]`` -> float32 ``[T, d]``."""
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps)).astype(np.float32)) * w


def _matmul(x: np.ndarray, wmat: np.ndarray, f16_weight: bool, emulate: bool) -> np.ndarray:
    """``x @ wmat.T`` with ``x`` float32 ``[T, in]``, ``wmat`` ``[out, in]``; rounds ``x`` to f16 first when the
    weight is stored F16 and ``emulate`` is on (ggml CPU converts src1 to the weight's vec_dot type)."""
    if f16_weight and emulate:
        x = _f16(x)
    return x.astype(np.float32) @ wmat.T


def rope_angles(positions: np.ndarray, head_dim: int, freq_base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin float32 ``[T, head_dim // 2]`` for NORM RoPE, built like ggml's ``ggml_rope_cache_init``."""
    theta_scale = np.float32(np.power(np.float32(freq_base), np.float32(-2.0) / np.float32(head_dim),
                                      dtype=np.float32))
    theta = np.empty((len(positions), head_dim // 2), dtype=np.float32)
    t = np.asarray(positions, dtype=np.float32)
    for i in range(head_dim // 2):  # theta starts at p and is multiplied by theta_scale in float32, as in ggml
        theta[:, i] = t
        t = (t * theta_scale).astype(np.float32)
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def apply_rope(x: np.ndarray, positions: np.ndarray, freq_base: float, neox: bool = False) -> np.ndarray:
    """Rotate pairs of ``x`` float32 ``[T, n_heads, head_dim]`` by the RoPE of ``positions`` int ``[T]``:
    adjacent pairs (NORM) or, with ``neox``, pairs ``(i, i + head_dim/2)``; returns float32 like ``x``."""
    cos, sin = rope_angles(positions, x.shape[-1], freq_base)
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    i0, i1 = (slice(0, half), slice(half, None)) if neox else (slice(0, None, 2), slice(1, None, 2))
    x0, x1 = x[..., i0], x[..., i1]
    out = np.empty_like(x)
    out[..., i0] = x0 * cos - x1 * sin
    out[..., i1] = x0 * sin + x1 * cos
    return out


def _softmax(s: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(s, axis=axis, keepdims=True)
    e = np.exp(s - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, n_group: int,
            ggml_rounding: bool) -> np.ndarray:
    """Masked attention. ``q`` float32 ``[n_head, T, hd]``, ``k``/``v`` float32
    ``[n_kv_head, n_k, hd]``, ``mask`` bool ``[T, n_k]`` (True = visible) shared by all heads, or
    ``[n_kv_head, T, n_k]`` per KV head. ``ggml_rounding`` rounds ``q`` to f16 (as ``mul_mat(k_f16, q)`` and
    flash attention do) and the softmax to f16 before ``P·V`` (the non-flash path's ``mul_mat(v_f16, kq)``).
    Returns float32 ``[T, n_head * hd]``."""
    n_head, T, hd = q.shape
    if ggml_rounding:
        q = _f16(q)
    kk = np.repeat(k, n_group, axis=0).astype(np.float64)
    vv = np.repeat(v, n_group, axis=0).astype(np.float64)
    s = np.einsum("htd,hkd->htk", q.astype(np.float64), kk) / np.sqrt(hd)
    m = mask[None] if mask.ndim == 2 else np.repeat(mask, n_group, axis=0)
    s = np.where(m, s, -np.inf)
    p = _softmax(s)
    if ggml_rounding:
        p = _f16(p.astype(np.float32))
    o = np.einsum("htk,hkd->htd", p, vv)
    return o.transpose(1, 0, 2).reshape(T, n_head * hd).astype(np.float32)


FA_TILE_Q = 64
"""ggml CPU flash attention uses its tiled all-f32 kernel when a batch has at least this many queries."""


def _attend_flash(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, n_group: int) -> np.ndarray:
    """ggml CPU flash attention, one-query-at-a-time kernel (``flash_attn_ext_f16_one_chunk``, used for batches
    of fewer than :data:`FA_TILE_Q` queries): f16 query, keys visited in cell order with an online softmax
    whose ``P·V`` accumulator is f16. Shapes as in :func:`_attend`; returns float32 ``[T, n_head * hd]``."""
    n_head, T, hd = q.shape
    n_k = k.shape[1]
    kk = np.repeat(k, n_group, axis=0)
    vv = np.repeat(v, n_group, axis=0)
    m = np.broadcast_to(mask[None], (n_head, T, n_k)) if mask.ndim == 2 else np.repeat(mask, n_group, axis=0)
    scores = (np.einsum("htd,hkd->htk", _f16(q).astype(np.float64), kk.astype(np.float64))
              .astype(np.float32) * np.float32(1.0 / np.sqrt(hd)))
    M = np.full((n_head, T), -np.inf, np.float32)
    S = np.zeros((n_head, T), np.float32)
    acc = np.zeros((n_head, T, hd), np.float32)  # holds f16 values
    with np.errstate(invalid="ignore", over="ignore"):
        for j in range(n_k):
            vis = m[:, :, j]
            if not vis.any():
                continue
            s = scores[:, :, j]
            new_max = vis & (s > M)
            ms = np.where(new_max, np.exp(M - s), np.float32(1.0)).astype(np.float32)
            vs = np.where(new_max, np.float32(1.0), np.exp(s - M)).astype(np.float32)
            ms, vs = np.where(vis, ms, 1.0).astype(np.float32), np.where(vis, vs, 0.0).astype(np.float32)
            M = np.where(new_max, s, M)
            acc = np.where(new_max[..., None], _f16(acc * ms[..., None]), acc)
            acc = np.where(vis[..., None], _f16(acc + vv[:, j][:, None, :] * vs[..., None]), acc)
            S = S * ms + vs
    out = acc * np.where(S == 0, np.float32(0.0), np.float32(1.0) / S)[..., None]
    return out.transpose(1, 0, 2).reshape(T, n_head * hd).astype(np.float32)


def _attention(q, k, v, mask, n_group: int, ggml_rounding: bool, flash_attn: bool) -> np.ndarray:
    """Dispatch like ggml's CPU backend: non-flash path, flash one-chunk kernel, or flash tiled (f32) kernel."""
    if flash_attn and ggml_rounding:
        if q.shape[1] < FA_TILE_Q:
            return _attend_flash(q, k, v, mask, n_group)
        return _attend(q, k, v, mask, n_group, ggml_rounding=False)
    return _attend(q, k, v, mask, n_group, ggml_rounding)


def _qkv(w: TinyWeights, L: TinyLayer, x: np.ndarray, positions: np.ndarray, emulate: bool):
    """Post-RoPE q ``[n_head, T, hd]`` and f16-rounded k, v ``[n_kv_head, T, hd]`` of layer input ``x``."""
    c = w.config
    T = x.shape[0]
    h = rms_norm(x, L.attn_norm, c.rms_eps)
    q, k, v = (_matmul(h, wm, L.f16, emulate) + (0.0 if b is None else b)
               for wm, b in ((L.wq, L.bq), (L.wk, L.bk), (L.wv, L.bv)))
    q = q.reshape(T, c.n_head, c.head_dim)
    k = k.reshape(T, c.n_kv_head, c.head_dim)
    v = v.reshape(T, c.n_kv_head, c.head_dim)
    if L.q_norm is not None:  # qwen3: RMSNorm of every head's q and k before RoPE
        q = rms_norm(q, L.q_norm, c.rms_eps)
    if L.k_norm is not None:
        k = rms_norm(k, L.k_norm, c.rms_eps)
    neox = c.arch in ARCH_SPECS and ARCH_SPECS[c.arch].neox
    q = apply_rope(q, positions, c.rope_freq_base, neox).transpose(1, 0, 2)
    k = _f16(apply_rope(k, positions, c.rope_freq_base, neox)).transpose(1, 0, 2)
    return q, k, _f16(v).transpose(1, 0, 2)


def _finish_layer(w: TinyWeights, L: TinyLayer, x: np.ndarray, attn: np.ndarray, emulate: bool) -> np.ndarray:
    """Output projection, residual, SwiGLU FFN, residual. ``x``, result float32 ``[T, d]``."""
    x = x + _matmul(attn, L.wo, L.f16, emulate)
    h = rms_norm(x, L.ffn_norm, w.config.rms_eps)
    g = _matmul(h, L.w_gate, L.f16, emulate)
    u = _matmul(h, L.w_up, L.f16, emulate)
    return x + _matmul((g / (1.0 + np.exp(-g))) * u, L.w_down, L.f16, emulate)


def _logits(w: TinyWeights, x: np.ndarray, emulate: bool) -> np.ndarray:
    return _matmul(rms_norm(x, w.output_norm, w.config.rms_eps), w.output, w.output_f16, emulate)


def prefill(w: TinyWeights, tokens, positions=None, *, ggml_rounding: bool = True, flash_attn: bool = False) -> RefOut:
    """Run ``tokens`` int ``[T]`` through the model from an empty cache, causally.

    ``positions`` int ``[T]`` defaults to ``0..T-1``; the causal mask compares positions (key ``j`` is visible to
    query ``i`` when ``pos[j] <= pos[i]``), as llama.cpp's mask does. ``ggml_rounding`` mirrors the CPU
    backend's f16 roundings (module docstring); ``flash_attn`` selects the attention kernel to mirror (set it
    as the llama.cpp context has it; it only changes rounding). Returns :class:`RefOut`.
    """
    c = w.config
    tokens = np.asarray(tokens, dtype=np.int64)
    pos = np.arange(len(tokens), dtype=np.int32) if positions is None else positions
    empty = np.zeros((c.n_layer, c.n_kv_head, 0, c.head_dim), np.float32)
    return decode_many_with_cache(w, empty, empty, np.zeros(0, np.int32), tokens, pos,
                                  ggml_rounding=ggml_rounding, flash_attn=flash_attn)


def decode_many_with_cache(w: TinyWeights, k_cache: np.ndarray, v_cache: np.ndarray, cache_pos, tokens, positions,
                           *, ggml_rounding: bool = True, flash_attn: bool = False) -> RefOut:
    """Decode a batch ``tokens`` int ``[T]`` at ``positions`` int ``[T]`` on top of an existing cache.

    ``k_cache``, ``v_cache`` float32 ``[n_layer, n_kv_head, n_cells, head_dim]`` hold post-RoPE K and V (they
    are rounded to f16 here, as the cache stores them); each KV head may hold a different token (or a merged
    state) in the same cell. ``cache_pos`` int ``[n_cells]`` or ``[n_layer, n_kv_head, n_cells]`` are the cells'
    positions, used only by the causal mask: cache cell ``j`` is visible to new token ``i`` when
    ``cache_pos[j] <= positions[i]`` (llama.cpp's mask hides a key only when its position is greater; a normal
    decode is at ``max(cache_pos) + 1``, where every cell is visible). New tokens see each other causally, and
    themselves. Returns :class:`RefOut` whose ``logits`` are ``[T, n_vocab]`` and whose ``k``/``v``/``q`` are the
    NEW tokens' entries only.
    ``ggml_rounding`` and ``flash_attn`` as in :func:`prefill`.
    """
    c = w.config
    tokens = np.asarray(tokens, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.int32)
    T = tokens.shape[0]
    kc = _f16(np.asarray(k_cache, dtype=np.float32))
    vc = _f16(np.asarray(v_cache, dtype=np.float32))
    if kc.shape != vc.shape or kc.shape[:2] != (c.n_layer, c.n_kv_head) or kc.shape[3] != c.head_dim:
        raise ValueError(f"cache shape {kc.shape} / {vc.shape} does not fit {c}")
    n_cells = kc.shape[2]
    cpos = np.broadcast_to(np.asarray(cache_pos, dtype=np.int32), (c.n_layer, c.n_kv_head, n_cells))
    self_mask = np.broadcast_to(pos[None, :] <= pos[:, None], (c.n_kv_head, T, T))
    x = w.tok_embd[tokens].astype(np.float32)
    qs = np.empty((c.n_layer, c.n_head, T, c.head_dim), np.float32)
    ks = np.empty((c.n_layer, c.n_kv_head, T, c.head_dim), np.float32)
    vs = np.empty_like(ks)
    for il, L in enumerate(w.layers):
        q, k, v = _qkv(w, L, x, pos, ggml_rounding)
        qs[il], ks[il], vs[il] = q, k, v
        cache_mask = cpos[il][:, None, :] <= pos[None, :, None]  # [n_kv_head, T, n_cells]
        mask = np.concatenate([cache_mask, self_mask], axis=2)
        attn = _attention(q, np.concatenate([kc[il], k], axis=1), np.concatenate([vc[il], v], axis=1),
                          mask, c.n_group, ggml_rounding, flash_attn)
        x = _finish_layer(w, L, x, attn, ggml_rounding)
    return RefOut(logits=_logits(w, x, ggml_rounding), k=ks, v=vs, q=qs, positions=pos)


def decode_with_cache(w: TinyWeights, k_cache: np.ndarray, v_cache: np.ndarray, cache_pos, token: int, pos: int,
                      *, ggml_rounding: bool = True, flash_attn: bool = False) -> np.ndarray:
    """Logits float32 ``[n_vocab]`` of one ``token`` at position ``pos`` decoded on top of the cache
    ``k_cache``/``v_cache`` float32 ``[n_layer, n_kv_head, n_cells, head_dim]`` with cell positions
    ``cache_pos`` int32 ``[n_cells]`` (see :func:`decode_many_with_cache`; cells with position ``<= pos``, and
    the token itself, are attended to, each KV head over its own cells)."""
    out = decode_many_with_cache(w, k_cache, v_cache, cache_pos, [token], [pos],
                                 ggml_rounding=ggml_rounding, flash_attn=flash_attn)
    return out.logits[0]


def attention_evidence(q: np.ndarray, k: np.ndarray, positions_q, positions_k, window: int | None = None) -> np.ndarray:
    """Column sums of the causal attention softmax over the last ``window`` queries (all when None).

    ``q`` float32 ``[n_layer, n_head, n_q, hd]``, ``k`` float32 ``[n_layer, n_kv_head, n_k, hd]`` (post-RoPE, e.g.
    from :class:`RefOut`), ``positions_q`` int ``[n_q]``, ``positions_k`` int ``[n_k]`` (key ``j`` is visible to
    query ``i`` when ``positions_k[j] <= positions_q[i]``). Scores are ``q·k / sqrt(hd)``, query head ``h``
    using KV head ``h // (n_head // n_kv_head)``. Returns float32 ``[n_layer, n_head, n_k]``: for each head,
    the total attention each key received (each query row sums to 1, so a row of the result sums to the
    number of queries in the window).
    """
    q = np.asarray(q, dtype=np.float32)
    k = np.asarray(k, dtype=np.float32)
    pq = np.asarray(positions_q, dtype=np.int32)
    pk = np.asarray(positions_k, dtype=np.int32)
    if window is not None:
        q, pq = q[:, :, -window:], pq[-window:]
    n_group = q.shape[1] // k.shape[1]
    kk = np.repeat(k, n_group, axis=1).astype(np.float64)
    s = np.einsum("lhqd,lhkd->lhqk", q.astype(np.float64), kk) / np.sqrt(q.shape[-1])
    s = np.where((pk[None, :] <= pq[:, None])[None, None], s, -np.inf)
    return _softmax(s).sum(axis=2).astype(np.float32)
