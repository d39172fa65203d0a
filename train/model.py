"""A small Llama-architecture language model in PyTorch, numerically laid out like llama.cpp's LLAMA graph.

Architecture (what :mod:`train.export` writes and llama.cpp runs): token embedding, ``n_layer``
pre-norm blocks (RMSNorm -> attention with GQA and RoPE -> residual; RMSNorm -> SwiGLU FFN -> residual), a final
RMSNorm and an output projection tied to the token embedding (llama.cpp duplicates ``token_embd`` when the GGUF
has no ``output.weight``).  RoPE is llama.cpp's ``LLAMA_ROPE_TYPE_NORM``: ADJACENT pairs ``(x[2i], x[2i+1])``
of each head rotate by ``pos * base**(-2i/head_dim)`` (see :mod:`support.reference`), and GGUF
Q/K rows are used as stored, so no HF permutation is involved anywhere.  Query head ``h`` reads KV head
``h // (n_head // n_kv_head)``.

:func:`init_circuit` hand-sets a previous-token / induction circuit in the first two layers (the measured lead
of issue 6: it makes key -> value retrieval trainable within a CPU budget); everything stays trainable.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kvmerge_local.tiny.model import TinyConfig

logger = logging.getLogger(__name__)


def default_config(**overrides) -> TinyConfig:
    """The embedded model's shape as a :class:`~kvmerge_local.tiny.model.TinyConfig` (the fields the
    project's GGUF writer/reader maps to the ``llama.*`` keys): 4 layers, d_model 256, 2 query heads and 1 KV
    head of 128, FFN 704, the 4096-token vocabulary prefix, RoPE base 1e6, context 4096; ``overrides``
    replace fields."""
    base = dict(n_vocab=4096, d_model=256, n_layer=4, n_head=2, n_kv_head=1, head_dim=128, n_ff=704,
                rope_freq_base=1_000_000.0, rms_eps=1e-5, n_ctx_train=4096)
    return TinyConfig(**{**base, **overrides})


def rope_tables(n_pos: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 ``[n_pos, head_dim // 2]`` built like ggml's ``rope_cache_init`` (float32 running
    product of ``base**(-2/head_dim)``), so angles agree with llama.cpp to float32 rounding."""
    scale = np.float32(np.power(np.float32(base), np.float32(-2.0) / np.float32(head_dim), dtype=np.float32))
    theta = np.empty((n_pos, head_dim // 2), dtype=np.float32)
    t = np.arange(n_pos, dtype=np.float32)
    for i in range(head_dim // 2):
        theta[:, i] = t
        t = (t * scale).astype(np.float32)
    return torch.from_numpy(np.cos(theta)), torch.from_numpy(np.sin(theta))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs. ``x`` float32 ``[B, H, T, hd]``; ``cos``/``sin`` ``[T, hd // 2]``."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x**2) + eps) * w`` over the last dimension."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """One pre-norm transformer block. Weights are ``[out, in]`` (``nn.Linear`` and GGUF NumPy order)."""

    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.wq = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)
        self.ffn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.w_gate = nn.Linear(c.d_model, c.n_ff, bias=False)
        self.w_up = nn.Linear(c.d_model, c.n_ff, bias=False)
        self.w_down = nn.Linear(c.n_ff, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` float32 ``[B, T, d]`` -> ``[B, T, d]`` (causal)."""
        c = self.c
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = self.wk(h).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = self.wv(h).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.n_group > 1:
            k = k.repeat_interleave(c.n_group, dim=1)
            v = v.repeat_interleave(c.n_group, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class LlamaLM(nn.Module):
    """The whole model; ``forward(tokens int64 [B, T]) -> logits float32 [B, T, n_vocab]``."""

    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.c = c
        self.tok_embd = nn.Embedding(c.n_vocab, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.output_norm = RMSNorm(c.d_model, c.rms_eps)
        cos, sin = rope_tables(c.n_ctx_train, c.head_dim, c.rope_freq_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states float32 ``[B, T, d]``."""
        T = tokens.shape[1]
        if T > self.cos.shape[0]:
            cos, sin = rope_tables(T, self.c.head_dim, self.c.rope_freq_base)
        else:
            cos, sin = self.cos[:T], self.sin[:T]
        x = self.tok_embd(tokens)
        for blk in self.layers:
            x = blk(x, cos, sin)
        return self.output_norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hidden(tokens) @ self.tok_embd.weight.T

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _slow_pairs(c: TinyConfig, n: int) -> np.ndarray:
    """Indices of the ``n`` slowest RoPE pairs (the last ones): content matching there is nearly
    position-independent over ``n_ctx_train`` tokens."""
    return np.arange(c.head_dim // 2 - n, c.head_dim // 2)


def init_circuit(model: LlamaLM, seed: int = 0, *, n_pos_pairs: int = 16, pos_gain: float = 85.0,
                 match_gain: float = 3.0, copy_gain: float = 4.0, out_gain: float = 0.12) -> dict:
    """Hand-set a retrieval circuit, then leave everything trainable.

    Residual layout (d=256, head_dim=128): token content in dims ``C=[0,128)``; layer 0 head 0 (previous token)
    writes a 42-d projection of the previous token's content into ``P1=[128,170)`` and head 1 (two back) the
    one of the token two back into ``P2=[170,212)``; dim 255 is a constant (every embedding row has it), which
    the positional heads read through RoPE's fast pairs.  Layer 1 head 0 is the retrieval head: its query is
    ``P1`` (the key just read, e.g. ``... of KEY is``) and its key is ``P2`` (the token two back: in
    ``KEY is VALUE`` that is KEY at VALUE's position), both placed in the slowest RoPE pairs; its value is the
    position's own content, written back into ``C`` with ``copy_gain`` so the tied unembedding predicts it.
    Other heads, the FFNs and layers >= 2 start small and random.  Returns a dict of the init settings.
    """
    c = model.c
    if (c.d_model, c.head_dim, c.n_head, c.n_kv_head) != (256, 128, 2, 1) or c.n_layer < 2:
        raise ValueError("init_circuit expects d_model=256, head_dim=128, n_head=2, n_kv_head=1, n_layer>=2")
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    C, P1, P2, CONST = slice(0, 128), slice(128, 170), slice(170, 212), 255
    n_m = 42
    beta = 8.0

    def small(t: torch.Tensor, scale: float) -> None:
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g) * scale / math.sqrt(t.shape[1]))

    with torch.no_grad():
        emb = torch.randn(c.n_vocab, 128, generator=g)
        emb = emb / emb.norm(dim=1, keepdim=True) * math.sqrt(128)
        model.tok_embd.weight.zero_()
        model.tok_embd.weight[:, C] = emb
        model.tok_embd.weight[:, CONST] = beta
        for blk in model.layers:
            for lin, s in ((blk.wq, 1.0), (blk.wk, 1.0), (blk.wv, 1.0), (blk.wo, 0.05), (blk.w_gate, 1.0),
                           (blk.w_up, 1.0), (blk.w_down, 0.05)):
                small(lin.weight, s)
        xhat_const = beta / math.sqrt((128 + beta ** 2) / 256)  # dim 255 after layer-0 RMSNorm
        # layer 0: positional heads (offset 1 -> P1, offset 2 -> P2) on the fast RoPE pairs
        L0 = model.layers[0]
        theta = c.rope_freq_base ** (-2.0 * np.arange(n_pos_pairs) / c.head_dim)
        L0.wk.weight.zero_()
        L0.wq.weight.zero_()
        for i in range(n_pos_pairs):
            L0.wk.weight[2 * i, CONST] = 1.0 / xhat_const
            for h, delta in ((0, 1), (1, 2)):
                L0.wq.weight[h * 128 + 2 * i, CONST] = pos_gain * math.cos(delta * theta[i]) / xhat_const
                L0.wq.weight[h * 128 + 2 * i + 1, CONST] = -pos_gain * math.sin(delta * theta[i]) / xhat_const
        M = torch.from_numpy(np.linalg.qr(rng.standard_normal((128, n_m)))[0].T.astype(np.float32))  # [42,128]
        L0.wv.weight.zero_()
        L0.wv.weight[:n_m, C] = M
        L0.wo.weight.zero_()
        L0.wo.weight[P1, 0:n_m] = torch.eye(n_m)
        L0.wo.weight[P2, 128:128 + n_m] = torch.eye(n_m)
        # layer 1: retrieval head, query P1 (slow pairs) . key P2 (slow pairs), value = own content -> C
        L1 = model.layers[1]
        slow = _slow_pairs(c, n_m // 2)
        dims = torch.from_numpy(np.stack([2 * slow, 2 * slow + 1], 1).reshape(-1))
        L1.wq.weight[:128].zero_()
        L1.wk.weight.zero_()
        L1.wq.weight[dims, P1] = match_gain * torch.eye(n_m)
        L1.wk.weight[dims, P2] = torch.eye(n_m)
        L1.wv.weight.zero_()
        L1.wv.weight[:, C] = torch.eye(128)
        L1.wo.weight[:, :128].zero_()
        L1.wo.weight[C, 0:128] = copy_gain * torch.eye(128)
        model.output_norm.weight.fill_(out_gain)
    settings = dict(seed=seed, n_pos_pairs=n_pos_pairs, pos_gain=pos_gain, match_gain=match_gain,
                    copy_gain=copy_gain, out_gain=out_gain)
    logger.info("hand-set retrieval circuit: %s", settings)
    return settings
