"""Tiny LLAMA-architecture GGUF models for tests, with the real Llama-2 SentencePiece tokenizer.

``make_tiny_llama`` writes a random but well-scaled model (RMSNorm, RoPE in llama.cpp's NORM mode, SwiGLU,
GQA) that llama.cpp loads as ``general.architecture = "llama"`` (or, with ``arch=``, as ``qwen2``/``qwen3``:
see :mod:`kvmerge_local.tiny.arch`); ``load_weights`` reads any such file back into float32 NumPy arrays for
the NumPy reference forward (``tests/support/reference.py``). ``make_bad_gguf`` writes files that must be
refused: unreadable ones (truncated, bad magic), ones llama.cpp cannot load (unknown architecture, missing
tensor), and a sliding-window model (``gemma2``) that llama.cpp loads but whose cache the project cannot compact.

Weight layout (NumPy order, the reverse of ggml's ``ne``): every matrix is ``[out, in]`` so ``y = x @ W.T``;
``token_embd`` and ``output`` are ``[n_vocab, d_model]``. Head ``h`` of Q (and of K/V) is rows
``h*head_dim:(h+1)*head_dim``; query head ``h`` reads KV head ``h // (n_head // n_kv_head)``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .arch import ARCH_SPECS, OPTIONAL_LAYER_TENSORS, arch_layer_weights, read_optional_layer_tensors, spec

logger = logging.getLogger(__name__)

VOCAB_GGUF = Path(__file__).resolve().parent.parent / "data" / "llama2-vocab.gguf"
"""Vocab-only Llama-2 GGUF (from llama.cpp's models/, MIT) whose ``tokenizer.ggml.*`` keys are copied."""

LLAMA2_N_VOCAB = 32000
_N_SPECIAL_AND_BYTES = 259  # <unk>, <s>, </s>, then the 256 byte-fallback tokens <0x00>..<0xFF>

WeightType = Literal["f32", "f16"]
BadKind = Literal["truncated", "bad_magic", "unknown_arch", "missing_tensor", "swa"]
BAD_KINDS: tuple[str, ...] = ("truncated", "bad_magic", "unknown_arch", "missing_tensor", "swa")


@dataclass(frozen=True)
class TinyConfig:
    """Hyperparameters of a tiny model, as written to (and read back from) the GGUF metadata."""

    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 64
    d_model: int = 256
    n_ff: int = 704
    n_vocab: int = LLAMA2_N_VOCAB
    n_ctx_train: int = 4096
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    bos_id: int = 1
    eos_id: int = 2
    arch: str = "llama"

    @property
    def n_group(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.n_head // self.n_kv_head

    @property
    def n_embd_kv(self) -> int:
        """Width of one K (or V) row in the cache: ``n_kv_head * head_dim``."""
        return self.n_kv_head * self.head_dim


@dataclass
class TinyLayer:
    """One transformer block, float32. Shapes: norms ``[d_model]``; ``wq [n_head*hd, d]``,
    ``wk``/``wv [n_kv_head*hd, d]``, ``wo [d, n_head*hd]``, ``w_gate``/``w_up [n_ff, d]``, ``w_down [d, n_ff]``.
    ``f16`` is True when the matrices were stored as F16 (llama.cpp's CPU matmul then rounds its input
    activations to f16, which the reference mirrors). Optional (None unless the architecture has them):
    biases ``bq [n_head*hd]``, ``bk``/``bv [n_kv_head*hd]``; per-head RMSNorm weights ``q_norm``/``k_norm [hd]``."""

    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    f16: bool = False
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None


@dataclass
class TinyWeights:
    """A whole model in float32: ``tok_embd [n_vocab, d]``, ``output [n_vocab, d]`` (the same array as
    ``tok_embd`` when tied), ``output_norm [d]``, ``layers``; ``output_f16`` tells whether ``output`` was F16."""

    config: TinyConfig
    tok_embd: np.ndarray
    output_norm: np.ndarray
    output: np.ndarray
    layers: list[TinyLayer]
    output_f16: bool = False


def default_n_ff(d_model: int) -> int:
    """Llama's FFN width rule: 8/3 of ``d_model`` rounded up to a multiple of 64."""
    return -(-(8 * d_model // 3) // 64) * 64


@functools.lru_cache(maxsize=1)
def _llama2_vocab() -> dict[str, Any]:
    """All tokenizer metadata of :data:`VOCAB_GGUF` (read once per process; GGUFReader takes ~1 s on it)."""
    from gguf import GGUFReader

    f = GGUFReader(VOCAB_GGUF).fields
    return {
        "tokens": tuple(f["tokenizer.ggml.tokens"].contents()),
        "scores": np.asarray(f["tokenizer.ggml.scores"].contents(), dtype=np.float32),
        "types": np.asarray(f["tokenizer.ggml.token_type"].contents(), dtype=np.int32),
        "model": f["tokenizer.ggml.model"].contents(),
        "pre": f["tokenizer.ggml.pre"].contents(),
        "bos": int(f["tokenizer.ggml.bos_token_id"].contents()),
        "eos": int(f["tokenizer.ggml.eos_token_id"].contents()),
        "unk": int(f["tokenizer.ggml.unknown_token_id"].contents()),
        "add_bos": bool(f["tokenizer.ggml.add_bos_token"].contents()),
        "add_eos": bool(f["tokenizer.ggml.add_eos_token"].contents()),
    }


def _read_vocab(vocab: str, n_vocab: int | None) -> dict[str, Any]:
    """Tokenizer metadata from :data:`VOCAB_GGUF`: ``tokens``, ``scores``, ``types`` (truncated to the first
    ``n_vocab`` entries when asked; the Llama-2 list is sorted by merge priority after the 259 special and
    byte tokens, so a prefix is still a valid byte-fallback SPM vocab) and the scalar ``tokenizer.ggml.*`` keys."""
    if vocab not in ("llama2", "llama2-small"):
        raise ValueError(f"unknown vocab {vocab!r}: use 'llama2' or 'llama2-small'")
    if n_vocab is None:
        n_vocab = LLAMA2_N_VOCAB if vocab == "llama2" else 4096
    if not _N_SPECIAL_AND_BYTES + 1 <= n_vocab <= LLAMA2_N_VOCAB:
        raise ValueError(f"n_vocab must be in [{_N_SPECIAL_AND_BYTES + 1}, {LLAMA2_N_VOCAB}], got {n_vocab}")
    full = _llama2_vocab()
    return {**full, "tokens": list(full["tokens"][:n_vocab]), "scores": full["scores"][:n_vocab],
            "types": full["types"][:n_vocab]}


def random_weights(cfg: TinyConfig, *, seed: int = 0, qk_gain: float = 1.5, logit_gain: float = 4.0,
                   tie_embeddings: bool = False) -> TinyWeights:
    """Random float32 weights with sensible scales for ``cfg``.

    Attention logits ``q·k/sqrt(head_dim)`` have a standard deviation of about ``qk_gain**2`` (so attention is
    clearly non-uniform), the residual stream stays O(1), and output logits have a spread of about
    ``logit_gain`` (with ``tie_embeddings`` the logits are ``norm(h) @ tok_embd.T`` instead).
    """
    rng = np.random.default_rng(seed)
    d, hd = cfg.d_model, cfg.head_dim

    def mat(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(gain / np.sqrt(cols))

    def norm_w() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    tok_embd = rng.standard_normal((cfg.n_vocab, d), dtype=np.float32)
    layers = [TinyLayer(attn_norm=norm_w(), wq=mat(cfg.n_head * hd, d, qk_gain), wk=mat(cfg.n_kv_head * hd, d, qk_gain),
                        wv=mat(cfg.n_kv_head * hd, d), wo=mat(d, cfg.n_head * hd), ffn_norm=norm_w(),
                        w_gate=mat(cfg.n_ff, d), w_up=mat(cfg.n_ff, d), w_down=mat(d, cfg.n_ff, 0.5))
              for _ in range(cfg.n_layer)]
    if cfg.arch in ARCH_SPECS:  # biases / Q-K norms, from their own generator (the shared weights stay put)
        extras = arch_layer_weights(cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_kv_head, hd, seed=seed, qk_gain=qk_gain)
        layers = [dataclasses.replace(L, **x) for L, x in zip(layers, extras)]
    output_norm = norm_w()
    if tie_embeddings:
        output = tok_embd
        output_norm *= np.float32(logit_gain / np.sqrt(d))
    else:
        output = mat(cfg.n_vocab, d, logit_gain)
    return TinyWeights(cfg, tok_embd, output_norm, output, layers)


def _write_gguf(path: Path, w: TinyWeights, vocab: dict[str, Any], *, weight_type: WeightType, embed_type: WeightType,
                tie_embeddings: bool, chat_template: str | None, name: str,
                extra_tensors: dict[str, np.ndarray] | None = None, drop_tensors: tuple[str, ...] = (),
                extra_kv: dict[str, Any] | None = None) -> None:
    """Write ``w`` as a GGUF for ``w.config.arch``. ``extra_kv`` values are ``(GGUFValueType, value)`` pairs
    keyed by the full key name; ``drop_tensors`` omits tensors by name (for broken files)."""
    import gguf

    cfg = w.config
    arch = cfg.arch
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(name)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_ctx_train)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.n_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_freq_base)
    writer.add_vocab_size(cfg.n_vocab)
    if cfg.d_model != cfg.n_head * cfg.head_dim or (arch in ARCH_SPECS and ARCH_SPECS[arch].explicit_head_dims):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if weight_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"].tolist())
    writer.add_token_types(vocab["types"].tolist())
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_unk_token_id(vocab["unk"])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, (vtype, value) in (extra_kv or {}).items():
        writer.add_key_value(key, value, vtype)

    mat_dt = np.float32 if weight_type == "f32" else np.float16
    emb_dt = np.float32 if embed_type == "f32" else np.float16
    tensors: dict[str, np.ndarray] = {"token_embd.weight": w.tok_embd.astype(emb_dt),
                                      "output_norm.weight": w.output_norm}
    if not tie_embeddings:
        tensors["output.weight"] = w.output.astype(emb_dt)
    for i, L in enumerate(w.layers):
        p = f"blk.{i}."
        tensors.update({p + "attn_norm.weight": L.attn_norm, p + "attn_q.weight": L.wq.astype(mat_dt),
                        p + "attn_k.weight": L.wk.astype(mat_dt), p + "attn_v.weight": L.wv.astype(mat_dt),
                        p + "attn_output.weight": L.wo.astype(mat_dt), p + "ffn_norm.weight": L.ffn_norm,
                        p + "ffn_gate.weight": L.w_gate.astype(mat_dt), p + "ffn_up.weight": L.w_up.astype(mat_dt),
                        p + "ffn_down.weight": L.w_down.astype(mat_dt)})
        tensors.update({p + t: getattr(L, f) for f, t in OPTIONAL_LAYER_TENSORS.items() if getattr(L, f) is not None})
    tensors.update(extra_tensors or {})
    for tname, arr in tensors.items():
        if tname not in drop_tensors:
            writer.add_tensor(tname, np.ascontiguousarray(arr))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_tiny_llama(path: str | Path, *, n_layer: int = 2, n_head: int = 4, n_kv_head: int = 2, head_dim: int = 64,
                    n_ff: int | None = None, d_model: int | None = None, n_ctx_train: int = 4096,
                    rope_freq_base: float = 10000.0, rms_eps: float = 1e-5, seed: int = 0,
                    weight_type: WeightType = "f32", embed_type: WeightType = "f16", tie_embeddings: bool = False,
                    vocab: str = "llama2", n_vocab: int | None = None, chat_template: str | None = None,
                    qk_gain: float = 1.5, logit_gain: float = 4.0, name: str = "kvmerge-tiny-llama",
                    arch: str = "llama", rope_freqs: tuple[float, ...] | None = None) -> Path:
    """Write a tiny random LLAMA-architecture GGUF to ``path`` and return it as a :class:`~pathlib.Path`.

    ``arch`` ("llama", "qwen2", "qwen3") picks the GGUF architecture (tensors, metadata prefix and RoPE
    pairing as in :mod:`~kvmerge_local.tiny.arch`); the shared weights of a seed are the same for all.

    ``weight_type`` is the storage type of the per-layer matrices, ``embed_type`` that of ``token_embd`` and
    ``output`` (the large ``[n_vocab, d_model]`` ones; f16 by default to keep files small). Norm weights are
    always f32. ``vocab="llama2"`` copies the full 32000-token Llama-2 tokenizer; ``"llama2-small"`` keeps its
    first ``n_vocab`` (default 4096) tokens, which still tokenizes any text via byte fallback, for ~4x smaller
    files. ``d_model`` defaults to ``n_head * head_dim`` and ``n_ff`` to :func:`default_n_ff`. Size with the
    defaults: about 39 MB (full vocab) or 10 MB (``llama2-small``); ``weight_type="f16"`` saves 3 MB.
    ``chat_template`` (Jinja text) is written to ``tokenizer.chat_template`` when given. ``rope_freqs``
    (``head_dim // 2`` floats) is written as ``rope_freqs.weight``, the per-pair frequency divisors of
    Llama-3.1-style RoPE scaling (the reference forward ignores it).
    """
    if n_head % n_kv_head:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
    if head_dim % 2:
        raise ValueError("head_dim must be even for RoPE")
    d_model = n_head * head_dim if d_model is None else d_model
    if spec(arch).square_attn and d_model != n_head * head_dim:
        raise ValueError(f"{arch} needs d_model == n_head * head_dim ({n_head * head_dim}), got {d_model}")
    voc = _read_vocab(vocab, n_vocab)
    cfg = TinyConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, d_model=d_model,
                     n_ff=default_n_ff(d_model) if n_ff is None else n_ff, n_vocab=len(voc["tokens"]),
                     n_ctx_train=n_ctx_train, rope_freq_base=rope_freq_base, rms_eps=rms_eps,
                     bos_id=voc["bos"], eos_id=voc["eos"], arch=arch)
    w = random_weights(cfg, seed=seed, qk_gain=qk_gain, logit_gain=logit_gain, tie_embeddings=tie_embeddings)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = None if rope_freqs is None else {"rope_freqs.weight": np.asarray(rope_freqs, np.float32)}
    _write_gguf(path, w, voc, weight_type=weight_type, embed_type=embed_type, tie_embeddings=tie_embeddings,
                chat_template=chat_template, name=name, extra_tensors=extra)
    logger.debug("wrote tiny %s %s (%s, %.1f MB)", arch, path, cfg, path.stat().st_size / 1e6)
    return path


def make_bad_gguf(path: str | Path, kind: BadKind, *, seed: int = 0) -> Path:
    """Write a GGUF at ``path`` that must be refused, and return its path. ``kind``:

    - ``"truncated"``: a valid tiny model cut off in the middle of its tensor data (llama.cpp fails to load).
    - ``"bad_magic"``: a valid tiny model whose first four bytes are not ``GGUF`` (not a GGUF at all).
    - ``"unknown_arch"``: ``general.architecture = "kvmerge-nonexistent"`` (llama.cpp: unknown architecture).
    - ``"missing_tensor"``: a ``llama`` file without ``blk.0.attn_k.weight`` (llama.cpp: missing tensor).
    - ``"swa"``: a tiny ``gemma2`` model (every other layer sliding-window, window 16). llama.cpp LOADS it,
      but its KV cache is the two-part iSWA cache, so the project must refuse it itself.
    All use the ``llama2-small`` vocab (4096 tokens) to stay small.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("truncated", "bad_magic"):
        make_tiny_llama(path, vocab="llama2-small", seed=seed)
        data = bytearray(path.read_bytes())
        if kind == "truncated":
            data = data[: len(data) * 2 // 3]
        else:
            data[:4] = b"GGML"
        path.write_bytes(bytes(data))
        return path
    voc = _read_vocab("llama2-small", None)
    cfg = TinyConfig(n_vocab=len(voc["tokens"]))
    if kind == "unknown_arch":
        cfg = dataclasses.replace(cfg, arch="kvmerge-nonexistent")
    elif kind == "swa":
        cfg = dataclasses.replace(cfg, arch="gemma2")
    elif kind != "missing_tensor":
        raise ValueError(f"unknown bad GGUF kind {kind!r}; one of {BAD_KINDS}")
    w = random_weights(cfg, seed=seed, tie_embeddings=(kind == "swa"))
    extra_tensors: dict[str, np.ndarray] = {}
    extra_kv: dict[str, Any] = {}
    if kind == "swa":  # gemma2 ties output to token_embd and has post-attention / post-FFN norms
        for i in range(cfg.n_layer):
            extra_tensors[f"blk.{i}.post_attention_norm.weight"] = np.ones(cfg.d_model, np.float32)
            extra_tensors[f"blk.{i}.post_ffw_norm.weight"] = np.ones(cfg.d_model, np.float32)
        extra_kv["gemma2.attention.sliding_window"] = (gguf.GGUFValueType.UINT32, 16)
    _write_gguf(path, w, voc, weight_type="f16", embed_type="f16", tie_embeddings=(kind == "swa"),
                chat_template=None, name=f"kvmerge-bad-{kind}", extra_tensors=extra_tensors, extra_kv=extra_kv,
                drop_tensors=("blk.0.attn_k.weight",) if kind == "missing_tensor" else ())
    return path


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"GGUF has no key {key!r}")
        return default
    return f.contents()


def load_weights(path: str | Path) -> TinyWeights:
    """Read a LLAMA-architecture GGUF (F32/F16 tensors only) back into float32 :class:`TinyWeights`.

    Hyperparameters come from the ``<arch>.*`` keys; when ``output.weight`` is absent the output projection
    is ``tok_embd`` (tied), as in llama.cpp.
    """
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    arch = str(_field(reader, "general.architecture"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    d_model = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d_model // n_head))
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> tuple[np.ndarray, bool]:
        t = tensors[name]
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise ValueError(f"{name}: tensor type {t.tensor_type.name} not supported by load_weights")
        return np.array(t.data, dtype=np.float32, copy=True).reshape(tuple(int(s) for s in reversed(t.shape))), \
            t.tensor_type == GGMLQuantizationType.F16

    tok_embd, _ = get("token_embd.weight")
    cfg = TinyConfig(n_layer=int(_field(reader, f"{arch}.block_count")), n_head=n_head,
                     n_kv_head=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)), head_dim=head_dim,
                     d_model=d_model, n_ff=int(_field(reader, f"{arch}.feed_forward_length")),
                     n_vocab=tok_embd.shape[0], n_ctx_train=int(_field(reader, f"{arch}.context_length")),
                     rope_freq_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
                     rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
                     bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
                     eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)), arch=arch)
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        mats = {k: get(p + n) for k, n in (("wq", "attn_q.weight"), ("wk", "attn_k.weight"), ("wv", "attn_v.weight"),
                                          ("wo", "attn_output.weight"), ("w_gate", "ffn_gate.weight"),
                                          ("w_up", "ffn_up.weight"), ("w_down", "ffn_down.weight"))}
        f16 = {is16 for _, is16 in mats.values()}
        if len(f16) != 1:
            raise ValueError(f"layer {i}: mixed F16/F32 matrices are not supported")
        layers.append(TinyLayer(attn_norm=get(p + "attn_norm.weight")[0], ffn_norm=get(p + "ffn_norm.weight")[0],
                                f16=f16.pop(), **{k: a for k, (a, _) in mats.items()},
                                **read_optional_layer_tensors(get, set(tensors), p)))
    if "output.weight" in tensors:
        output, output_f16 = get("output.weight")
    else:
        output, output_f16 = tok_embd, tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.F16
    return TinyWeights(cfg, tok_embd, get("output_norm.weight")[0], output, layers, output_f16=output_f16)
