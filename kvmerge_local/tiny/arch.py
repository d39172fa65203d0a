"""What the tiny test models of :mod:`kvmerge_local.tiny.model` change per GGUF architecture.

Every accepted architecture shares the Llama block (RMSNorm, SwiGLU, GQA, one KV cache of post-RoPE keys);
they differ in a few tensors and in the RoPE pairing, as llama.cpp builds them (``src/models/<arch>.cpp``,
tensor names from ``src/llama-arch.cpp``):

- ``llama``: NORM RoPE (adjacent pairs), no extra tensors.
- ``qwen2``: NEOX RoPE (pairs ``(i, i + n_rot/2)``), Q/K/V biases ``blk.N.attn_{q,k,v}.bias``; its loader
  requires ``n_head * head_dim == d_model``.
- ``qwen3``: NEOX RoPE, no biases, a per-head RMSNorm of Q and of K before RoPE
  (``blk.N.attn_q_norm.weight`` / ``attn_k_norm.weight``, ``[head_dim]``), explicit
  ``qwen3.attention.key_length`` / ``value_length``.

The tokenizer does not depend on the architecture in llama.cpp (``llama-vocab.cpp`` reads only the
``tokenizer.ggml.*`` keys), so all of them keep the Llama-2 SentencePiece vocab of the tiny models.

:func:`make_refused_gguf` writes a metadata-only GGUF for an architecture that
:class:`~kvmerge_local.bridge.LlamaModel` refuses by name before llama.cpp loads anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture's tiny model differs from ``llama``."""

    neox: bool = False  # RoPE pairs (i, i + n_rot/2) instead of (2i, 2i+1)
    qkv_bias: bool = False  # blk.N.attn_{q,k,v}.bias
    qk_norm: bool = False  # blk.N.attn_{q,k}_norm.weight: RMSNorm per head before RoPE
    explicit_head_dims: bool = False  # always write <arch>.attention.key_length / value_length
    square_attn: bool = False  # the loader needs n_head * head_dim == d_model


ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "qwen2": ArchSpec(neox=True, qkv_bias=True, square_attn=True),
    "qwen3": ArchSpec(neox=True, qk_norm=True, explicit_head_dims=True),
}
TINY_ARCHS: tuple[str, ...] = tuple(ARCH_SPECS)

#: Optional per-layer tensors: TinyLayer field -> GGUF tensor name (after ``blk.N.``).
OPTIONAL_LAYER_TENSORS = {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
                          "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"}


def spec(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``arch`` (ValueError for an architecture the tiny models cannot build)."""
    if arch not in ARCH_SPECS:
        raise ValueError(f"tiny models exist for {', '.join(TINY_ARCHS)}, not {arch!r}")
    return ARCH_SPECS[arch]


def arch_layer_weights(arch: str, n_layer: int, n_head: int, n_kv_head: int, head_dim: int, *, seed: int,
                       qk_gain: float) -> list[dict[str, np.ndarray]]:
    """Per layer, the extra float32 arrays of ``arch`` keyed by TinyLayer field (empty dicts for ``llama``).

    Drawn from their own generator so the shared Llama weights of a seed stay the same for every arch.
    Biases have a standard deviation of 0.5 (Q/K projections are ~``qk_gain``); the Q/K norm weights are
    ``qk_gain * (1 + 0.1 N(0, 1))`` so that normalized q·k/sqrt(head_dim) spreads like the Llama models'.
    """
    s = spec(arch)
    rng = np.random.default_rng([seed, 0x9E37])
    out: list[dict[str, np.ndarray]] = []
    for _ in range(n_layer):
        extra: dict[str, np.ndarray] = {}
        if s.qkv_bias:
            for name, rows in (("bq", n_head), ("bk", n_kv_head), ("bv", n_kv_head)):
                extra[name] = (0.5 * rng.standard_normal(rows * head_dim)).astype(np.float32)
        if s.qk_norm:
            for name in ("q_norm", "k_norm"):
                extra[name] = (qk_gain * (1.0 + 0.1 * rng.standard_normal(head_dim))).astype(np.float32)
        out.append(extra)
    return out


def make_refused_gguf(path: str | Path, arch: str) -> Path:
    """A GGUF holding only ``general.architecture = arch`` (and a name): enough for the bridge's refusal by
    architecture name, which happens before llama.cpp would read (and reject) the missing hyperparameters."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(f"kvmerge-refused-{arch}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_optional_layer_tensors(get: Any, names: set[str], prefix: str) -> dict[str, np.ndarray]:
    """The optional tensors of one layer present in a GGUF: ``get(name) -> (float32 array, is_f16)``,
    ``names`` all tensor names of the file, ``prefix`` ``"blk.N."``; keyed by TinyLayer field."""
    return {field: get(prefix + t)[0] for field, t in OPTIONAL_LAYER_TENSORS.items() if prefix + t in names}
