"""Export a trained :class:`~train.model.LlamaLM` to a LLAMA-architecture GGUF, and read one back.

The file: ``general.architecture = "llama"``, the ``llama.*`` hyper-parameters, the tokenizer of the first 4096
tokens of the Llama-2 SentencePiece vocabulary (``tokenizer.ggml.*`` copied from the vendored vocab GGUF; a
prefix of that list is itself a valid byte-fallback SPM vocabulary, so llama.cpp tokenizes with it exactly as
training did), no ``output.weight`` (llama.cpp then ties the output to ``token_embd``), per-layer matrices and
the embedding in F16 (about 8 MB for the default 4M-parameter model), norms in F32.  Q/K rows are written as
trained: the model already uses llama.cpp's adjacent-pair (NORM) RoPE, so no permutation.  Writing and reading
reuse :mod:`kvmerge_local.tiny.model` (the project's GGUF writer and reader for LLAMA models).
``kvmerge.*`` keys record seed and recipe hash.

CLI: ``python -m train.export --ckpt CKPT --out kvmerge_local/data/kvmerge-tiny.gguf --json ...``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from kvmerge_local.tiny.model import TinyConfig, TinyLayer, TinyWeights, _read_vocab, _write_gguf, load_weights

from .model import LlamaLM

logger = logging.getLogger(__name__)

_TRAIN_DIR = Path(__file__).resolve().parent
# the corpus, facts and context assembly the training text is built from live with the benchmark's generator
RECIPE_FILES = ("data.py", "model.py", "train.py", "../kvmerge_local/quality/tasks.py")
_LAYER_ATTRS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


def recipe_hash(run_meta: dict | None = None) -> str:
    """sha256 over the training code (:data:`RECIPE_FILES`) and the run settings (``run.json`` contents)."""
    h = hashlib.sha256()
    for name in RECIPE_FILES:
        h.update((_TRAIN_DIR / name).read_bytes())
    h.update(json.dumps(run_meta or {}, sort_keys=True).encode())
    return h.hexdigest()


def to_tiny_weights(model: LlamaLM) -> TinyWeights:
    """The model as float32 :class:`~kvmerge_local.tiny.model.TinyWeights` (``[out, in]`` matrices,
    output tied to the embedding), the layout the project's GGUF writer and NumPy reference use."""
    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().copy()

    layers = [TinyLayer(**{attr: a(getattr(blk, attr).weight) for attr in _LAYER_ATTRS}) for blk in model.layers]
    emb = a(model.tok_embd.weight)
    return TinyWeights(model.c, emb, a(model.output_norm.weight), emb, layers)


def export_gguf(model: LlamaLM, path: str | Path, *, weight_type: str = "f16", name: str = "kvmerge-tiny",
                extra: dict[str, str | int] | None = None) -> Path:
    """Write ``model`` to ``path`` with 2-D tensors in ``weight_type`` ("f16" or "f32"; norms always f32) and
    return the path.  ``extra`` values become ``kvmerge.<key>`` metadata (str, or int as uint64)."""
    import gguf  # noqa: PLC0415

    if weight_type not in ("f16", "f32"):
        raise ValueError("weight_type must be 'f16' or 'f32'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kv = {f"kvmerge.{k}": (gguf.GGUFValueType.STRING, v) if isinstance(v, str)
          else (gguf.GGUFValueType.UINT64, int(v)) for k, v in (extra or {}).items()}
    _write_gguf(path, to_tiny_weights(model), _read_vocab("llama2-small", model.c.n_vocab), weight_type=weight_type,
                embed_type=weight_type, tie_embeddings=True, chat_template=None, name=name, extra_kv=kv)
    logger.info("wrote %s (%s, %.2f MB)", path, weight_type, path.stat().st_size / 1e6)
    return path


def load_gguf_model(path: str | Path) -> LlamaLM:
    """A float32 :class:`LlamaLM` holding the weights of a GGUF written by :func:`export_gguf` (F16 values are
    exact in float32, so this is the model llama.cpp runs, up to its own activation roundings)."""
    w = load_weights(path)
    model = LlamaLM(w.config)
    with torch.no_grad():
        model.tok_embd.weight.copy_(torch.from_numpy(w.tok_embd))
        model.output_norm.weight.copy_(torch.from_numpy(w.output_norm))
        for blk, L in zip(model.layers, w.layers):
            for attr in _LAYER_ATTRS:
                getattr(blk, attr).weight.copy_(torch.from_numpy(getattr(L, attr)))
    return model.eval()


def load_checkpoint(path: str | Path) -> tuple[LlamaLM, dict]:
    """(model, checkpoint dict) from a ``train.py`` checkpoint."""
    ck = torch.load(path, map_location="cpu")
    model = LlamaLM(TinyConfig(**ck["config"]))
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="export a train.py checkpoint to GGUF")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", default="f16", choices=("f16", "f32"))
    ap.add_argument("--json", default=None, help="also write this metrics/recipe JSON next to the model")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model, ck = load_checkpoint(args.ckpt)
    meta = ck.get("meta", {})
    rh = recipe_hash(meta)
    extra = {"seed": int(meta.get("seed", 0)), "recipe_sha256": rh, "train_step": int(ck["step"]),
             "train_tokens": int(ck["tokens"])}
    out = export_gguf(model, args.out, weight_type=args.type, extra=extra)
    if args.json:
        info = {"model": out.name, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
                "bytes": out.stat().st_size, "weight_type": args.type, "n_params": model.n_params(),
                "config": ck["config"], "seed": meta.get("seed"), "recipe_sha256": rh, "train": meta,
                "checkpoint": {"step": ck["step"], "tokens": ck["tokens"], "seq_len": ck.get("seq_len"),
                               "teacher_forced_eval": ck.get("eval")}}
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
