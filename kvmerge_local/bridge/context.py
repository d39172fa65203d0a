"""A llama.cpp model and a one-sequence context, with the checks that turn bad input into clear errors.

``LlamaModel`` validates the file before llama.cpp sees it (exists, GGUF magic, readable metadata, an
architecture the KV bridge can compact; known SWA, MLA, recurrent, hybrid and M-RoPE families are refused by
name with the reason, see ``REFUSED_ARCHS``) and after (a sliding window or M-RoPE found in the loaded
model).  ``LlamaContext`` owns one unified-cache context for sequence 0 and decodes NumPy token arrays.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import KVMergeError, ModelError
from . import _lib
from ..defaults import KV_TYPE_NAMES
from .state import TYPE_IDS, KVGeometry

log = logging.getLogger(__name__)

#: GGUF architectures whose KV cache is one standard RoPE cache of per-head post-RoPE K and V, proven on
#: tiny models by tests/test_architectures.py: llama (Llama-2/3, Mistral-7B, SmolLM2, TinyLlama), qwen2
#: (Qwen2/2.5: NEOX RoPE, Q/K/V biases), qwen3 (dense Qwen3: NEOX RoPE, per-head Q/K RMSNorm before RoPE).
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

_SWA = ("sliding-window attention: the cache is two caches (a window-sized ring for local layers and a full "
        "one), and the local layers forget everything outside the window")
_MLA = ("multi-head latent attention (MLA): the cache stores one compressed latent (and a shared RoPE key) per "
        "token, not per-head K and V")
_RECURRENT = "a recurrent state-space/RWKV model: it keeps a fixed-size recurrent state, not a KV cache of tokens"
_HYBRID = ("a hybrid recurrent/attention model: part of its memory is a recurrent state that cannot be "
           "compacted token by token")
_MROPE = ("multi-section RoPE (M-RoPE): keys are rotated by several position components (time, height, width), "
          "which cannot be re-indexed as one position")

#: Architectures refused by name before llama.cpp loads them, with the reason (family).
REFUSED_ARCHS: dict[str, str] = {
    **dict.fromkeys(("gemma2", "gemma3", "gemma3n", "gemma4", "cohere2", "gpt-oss", "granite_swa"), _SWA),
    "llama4": "chunked local attention (Llama 4's form of sliding-window attention): " + _SWA.split(": ", 1)[1],
    **dict.fromkeys(("deepseek2", "deepseek2-ocr", "deepseek32", "minicpm3", "plm", "glm-dsa"), _MLA),
    **dict.fromkeys(("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"), _RECURRENT),
    **dict.fromkeys(("jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h",
                     "nemotron_h_moe", "qwen3next", "qwen35", "qwen35moe", "kimi-linear", "minimax-01",
                     "deepseek4", "glm5-next"), _HYBRID),
    **dict.fromkeys(("qwen2vl", "qwen3vl", "qwen3vlmoe", "paddleocr"), _MROPE),
}

#: Cache types a user may ask for, by name.
KV_TYPES = {name: TYPE_IDS[name] for name in KV_TYPE_NAMES}


def _read_gguf_arch(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file; ModelError when it is not a readable GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (magic {magic!r}); kvmerge-local loads GGUF models "
                         "(see models.txt, or convert with llama.cpp's convert_hf_to_gguf.py)")
    try:
        from gguf import GGUFReader  # noqa: PLC0415

        reader = GGUFReader(str(path), "r")
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ModelError(f"{path} has no general.architecture key: not a model GGUF")
        arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    except ModelError:
        raise
    except Exception as exc:  # truncated or corrupt headers raise all sorts of errors in the reader
        raise ModelError(f"{path} is a corrupt or truncated GGUF file ({type(exc).__name__}: {exc}); "
                         "download it again and check its sha256 against models.txt") from exc
    return arch


def llama_can_load(path: str | os.PathLike) -> bool:
    """Whether llama.cpp itself loads the GGUF at ``path``, without this project's checks (the model is freed
    again): tests use it to tell files llama.cpp refuses from files only kvmerge-local refuses."""
    ptr = _lib.model_load(str(path), 0)
    if ptr:
        _lib.model_free(ptr)
    return bool(ptr)


class LlamaModel:
    """A GGUF model loaded by llama.cpp (patched build), checked for KV compaction support."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0) -> None:
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"model file not found: {p}")
        arch = _read_gguf_arch(p)
        if arch in REFUSED_ARCHS:
            raise ModelError(f"{p.name}: architecture '{arch}' is not supported: {REFUSED_ARCHS[arch]}; "
                             f"kvmerge-local compacts {', '.join(SUPPORTED_ARCHS)} models")
        if arch not in SUPPORTED_ARCHS:
            raise ModelError(f"{p.name}: architecture '{arch}' is not supported; kvmerge-local compacts "
                             f"the KV cache of {', '.join(SUPPORTED_ARCHS)}-architecture models "
                             "(Llama-2/3, Mistral-7B, SmolLM2, Qwen2/2.5, Qwen3); pick one from `kvmerge-local models`")
        self.path = p
        self.ptr = _lib.model_load(str(p), n_gpu_layers)
        if not self.ptr:
            raise ModelError(f"llama.cpp could not load {p} (corrupt tensors or unsupported contents; "
                             "run with log level DEBUG to see llama.cpp's reason)")
        self.info = _lib.model_info(self.ptr)
        problem = None
        if self.info["n_swa"] > 0:
            problem = "sliding-window attention"
        elif self.info["rope_type"] not in (0, 2):  # NORM or NEOX; M-RoPE/vision cannot be re-indexed
            problem = f"rope type {self.info['rope_type']} (M-RoPE)"
        if problem:
            self.close()
            raise ModelError(f"{p.name}: {problem} is not supported by the KV bridge (architecture "
                             f"'{arch}'); use a model with one full-attention RoPE cache "
                             f"({', '.join(SUPPORTED_ARCHS)})")
        n_head, n_kv = self.info["n_head"], self.info["n_head_kv"]
        arch_ = self.info["arch"]
        hd_k = int(self.meta(f"{arch_}.attention.key_length") or self.info["n_embd"] // n_head)
        hd_v = int(self.meta(f"{arch_}.attention.value_length") or hd_k)
        if hd_k != hd_v or hd_k % 32:
            self.close()
            raise ModelError(f"{p.name}: K/V head sizes {hd_k}/{hd_v} are not supported (equal multiples of 32)")
        self.geom = KVGeometry(self.info["n_layer"], n_kv, hd_k)
        log.info("loaded %s: %s", p.name, self.info)

    @property
    def n_vocab(self) -> int:
        return int(self.info["n_vocab"])

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> np.ndarray:
        """int32[n] token ids of ``text``."""
        return _lib.tokenize(self.ptr, text, add_bos, special)

    def piece(self, token: int) -> bytes:
        return _lib.token_piece(self.ptr, token)

    def is_eog(self, token: int) -> bool:
        return _lib.token_is_eog(self.ptr, token)

    def meta(self, key: str) -> str | None:
        return _lib.model_meta(self.ptr, key)

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            _lib.model_free(self.ptr)
            self.ptr = 0

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


class LlamaContext:
    """One llama.cpp context holding sequence 0 in a unified KV cache.

    ``kv_type``: "f16" (default), "f32", "bf16", "q8_0" or "q4_0" for both K and V (quantized V needs
    flash attention, as in llama.cpp).  ``n_batch`` is the largest ``decode`` call.
    """

    def __init__(self, model: LlamaModel, *, n_ctx: int = 2048, n_batch: int | None = None,
                 n_ubatch: int = 512, n_threads: int | None = None, flash_attn: bool = True,
                 kv_type: str = "f16", type_v: str | None = None) -> None:
        if kv_type not in KV_TYPES or (type_v is not None and type_v not in KV_TYPES):
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}")
        type_v = type_v or kv_type
        if KV_TYPES[type_v] not in (0, 1, 30) and not flash_attn:
            raise ValueError(f"a quantized V cache ({type_v}) needs flash attention (flash_attn=True)")
        if not 16 <= n_ctx <= 1 << 20:
            raise ValueError(f"n_ctx must be in [16, 1048576], got {n_ctx}")
        self.model = model
        self.n_batch = int(n_batch or n_ctx)
        self.flash_attn = flash_attn
        self.kv_type, self.type_v = kv_type, type_v
        threads = int(n_threads or min(4, os.cpu_count() or 1))
        self.ptr = _lib.context_new(model.ptr, n_ctx=n_ctx, n_batch=self.n_batch,
                                    n_ubatch=min(n_ubatch, self.n_batch), n_threads=threads,
                                    flash_attn=flash_attn, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[type_v])
        if not self.ptr:
            raise KVMergeError(f"llama.cpp could not create a context (n_ctx={n_ctx}, kv={kv_type}/{type_v}, "
                               f"flash_attn={flash_attn}); see the DEBUG log")
        self.n_ctx = _lib.n_ctx(self.ptr)
        self._batch = _lib.Batch(self.n_batch)

    @property
    def kv_name(self) -> str:
        """The cache types as a user names them: ``"q8_0"`` (K and V) or ``"q8_0/q4_0"`` (K/V)."""
        return self.kv_type if self.kv_type == self.type_v else f"{self.kv_type}/{self.type_v}"

    @property
    def n_past(self) -> int:
        """The next position: ``seq_pos_max + 1`` (0 when empty)."""
        return _lib.memory_seq_pos_max(self.ptr, 0) + 1

    def decode(self, tokens, positions=None, logits: str = "last") -> np.ndarray | None:
        """Run one ``llama_decode`` on ``tokens`` (int32[n], n <= n_batch).

        positions: int32[n], default consecutive from ``n_past``.  logits: "last" -> float32[n_vocab],
        "all" -> float32[n, n_vocab], "none" -> None.  Raises KVMergeError when llama.cpp fails (the
        cache is then as llama.cpp leaves it: the failed tokens removed).
        """
        tok = np.asarray(tokens, dtype=np.int32)
        n = len(tok)
        if n == 0:
            raise ValueError("decode needs at least one token")
        if np.any((tok < 0) | (tok >= self.model.n_vocab)):
            raise ValueError("token id out of the vocabulary")
        pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32) if positions is None \
            else np.asarray(positions, dtype=np.int32)
        out = np.zeros(n, dtype=np.int8)
        if logits == "all":
            out[:] = 1
        elif logits == "last":
            out[-1] = 1
        self._batch.fill(tok, pos, out)
        rc = _lib.decode(self.ptr, self._batch)
        if rc != 0:
            raise KVMergeError(f"llama_decode failed with {rc} ({n} tokens at positions {pos[0]}..{pos[-1]}, "
                               f"{self.n_ctx} cells; 1 means the cache is full)")
        if logits == "last":
            return _lib.logits_ith(self.ptr, -1, self.model.n_vocab)
        if logits == "all":
            return np.stack([_lib.logits_ith(self.ptr, i, self.model.n_vocab) for i in range(n)])
        return None

    def clear(self) -> None:
        """Empty the KV cache."""
        _lib.memory_clear(self.ptr)

    def close(self) -> None:
        if getattr(self, "ptr", 0):
            self._batch.free()
            _lib.context_free(self.ptr)
            self.ptr = 0

    def __enter__(self) -> LlamaContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
