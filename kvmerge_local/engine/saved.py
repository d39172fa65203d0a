"""Saved document caches: one file with the compressed KV state and everything needed to resume.

Layout (little-endian)::

    8 bytes  magic b"KVMDOC\\x00\\x01"
    u64      header length H
    H bytes  header: UTF-8 JSON (format version, model sha256/name/path, method, params, budget, document
             hash and name, pages, stats, context settings, the text tail for the question seam, and the
             table of arrays: name -> [offset, nbytes, dtype, shape], offsets relative to the payload)
    payload  the arrays back to back: ``blob`` (uint8, the llama.cpp sequence state), ``doc_pos`` and
             ``rope_pos`` (int32[L, H, N]), ``evidence`` (float32[L, H, N])

The header also stores the payload's sha256, so a truncated or corrupted file is refused before
anything reaches llama.cpp.  :func:`read_saved` raises :class:`SavedCacheError` with a clear message.
:meth:`DocumentCache.save <kvmerge_local.engine.cache.DocumentCache.save>` and ``.load`` write and read it
(``Session.load`` and the UI's saved-document list read only the header: :class:`SavedInfo`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KVMergeError

log = logging.getLogger(__name__)

MAGIC = b"KVMDOC\x00\x01"
FORMAT_VERSION = 1
_ARRAYS = ("blob", "doc_pos", "rope_pos", "evidence")
_MAX_HEADER = 64 << 20


class SavedCacheError(KVMergeError, ValueError):
    """A saved document cache that cannot be loaded (corrupt, foreign, or made for another model)."""


def _check_arrays(arrays: dict[str, np.ndarray]) -> None:
    blob = arrays["blob"]
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ValueError("blob must be uint8[n]")
    shapes = {arrays[n].shape for n in _ARRAYS[1:]}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError("doc_pos, rope_pos and evidence must share one [L, H, N] shape")


def write_saved(path: str | os.PathLike, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write the header ``meta`` and ``arrays`` (``blob``, ``doc_pos``, ``rope_pos``, ``evidence``) to ``path``
    atomically (a temp file renamed into place); returns the path."""
    p = Path(path)
    _check_arrays(arrays)
    arrays = {name: np.ascontiguousarray(arrays[name]) for name in _ARRAYS}
    table, off = {}, 0
    h = hashlib.sha256()
    for name, a in arrays.items():
        table[name] = [off, int(a.nbytes), a.dtype.str, list(a.shape)]
        off += a.nbytes
        h.update(memoryview(a).cast("B"))
    meta = dict(meta, format_version=FORMAT_VERSION, arrays=table, payload_sha256=h.hexdigest())
    header = json.dumps(meta, sort_keys=True).encode("utf-8")
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for a in arrays.values():
            f.write(memoryview(a).cast("B"))
    os.replace(tmp, p)
    log.info("saved document cache %s (%d bytes)", p, p.stat().st_size)
    return p


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a saved cache (cheap: the payload is not read)."""
    p = Path(path)
    if not p.is_file():
        raise SavedCacheError(f"saved cache not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(8)
        if magic != MAGIC:
            raise SavedCacheError(f"{p.name} is not a kvmerge-local document cache (bad magic {magic[:8]!r})")
        raw = f.read(8)
        if len(raw) != 8:
            raise SavedCacheError(f"{p.name} is truncated (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise SavedCacheError(f"{p.name} is corrupt (header of {n} bytes)")
        hdr = f.read(n)
    if len(hdr) != n:
        raise SavedCacheError(f"{p.name} is truncated (header)")
    try:
        meta = json.loads(hdr.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SavedCacheError(f"{p.name} is corrupt (header is not JSON: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise SavedCacheError(f"{p.name}: unsupported cache format version "
                              f"{meta.get('format_version') if isinstance(meta, dict) else '?'} "
                              f"(this kvmerge-local reads version {FORMAT_VERSION})")
    meta["_payload_offset"] = 16 + n
    return meta


def read_saved(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a saved cache (magic, version, payload sha256, array table): (header, arrays)."""
    p = Path(path)
    meta = read_header(p)
    start = meta.pop("_payload_offset")
    payload = np.fromfile(p, dtype=np.uint8, offset=start)
    if hashlib.sha256(memoryview(payload)).hexdigest() != meta.get("payload_sha256"):
        raise SavedCacheError(f"{p.name} is corrupt or truncated (payload checksum mismatch)")
    out = {}
    try:
        for name in _ARRAYS:
            off, nbytes, dt, shape = meta["arrays"][name]
            a = payload[off:off + nbytes]
            if a.nbytes != nbytes:
                raise SavedCacheError(f"{p.name} is truncated (array {name})")
            out[name] = a.view(np.dtype(dt)).reshape(shape)
        _check_arrays(out)
        return meta, out
    except SavedCacheError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SavedCacheError(f"{p.name} is corrupt (array table: {exc})") from exc


def check_model(meta: dict, model_sha256: str, model_name: str, path_name: str) -> None:
    """Refuse a cache made for another model (by sha256 of the GGUF file)."""
    want = (meta.get("model") or {}).get("sha256")
    if want != model_sha256:
        made = (meta.get("model") or {}).get("name") or "?"
        raise SavedCacheError(
            f"{path_name} was made for another model ({made}, sha256 {str(want)[:12]}...); this session runs "
            f"{model_name} (sha256 {model_sha256[:12]}...). Open the session with the model the cache was "
            "made with, or ingest the document again")


@dataclass(frozen=True)
class SavedInfo:
    """A saved cache's header without its cells (:meth:`DocumentCache.read_meta
    <kvmerge_local.engine.cache.DocumentCache.read_meta>`): the document's ``name``, ``sha256``, ``n_tokens``
    and ``pages`` ((page, first token, last token) triples), ``n_cells`` (cells saved), ``stats`` (the session's
    :meth:`Stats.as_dict <kvmerge_local.engine.stats.Stats.as_dict>` at save time) and the whole ``header``."""

    name: str
    sha256: str
    n_tokens: int
    n_cells: int
    pages: list[tuple[int, int, int]]
    stats: dict
    header: dict

    @classmethod
    def read(cls, path: str | os.PathLike) -> SavedInfo:
        """Read only the header of the saved cache at ``path``; raises :class:`SavedCacheError`."""
        p = Path(path)
        meta = read_header(p)
        meta.pop("_payload_offset", None)
        try:
            doc = meta.get("document") or {}
            shape = (meta.get("arrays") or {}).get("doc_pos", [0, 0, "", [0, 0, 0]])[3]
            return cls(name=str(doc.get("name", "")), sha256=str(doc.get("sha256", "")),
                       n_tokens=int(doc.get("n_tokens", 0)), n_cells=int(shape[-1]),
                       pages=[(int(a), int(b), int(c)) for a, b, c in doc.get("pages", [])],
                       stats=dict(meta.get("stats") or {}), header=meta)
        except (AttributeError, TypeError, ValueError, IndexError) as exc:
            raise SavedCacheError(f"{p.name} is corrupt (header: {exc})") from exc

    def open_kwargs(self) -> dict:
        """``Session.open`` keyword arguments for the settings the cache was made with."""
        m = self.header
        return {"n_ctx": m.get("n_ctx", 2048), "kv_type": m.get("kv_type", "f16"),
                "flash_attn": m.get("flash_attn", True), "method": m.get("method", "kvmerger"),
                "budget": m.get("budget", 0.5), "position_policy": m.get("position_policy", "auto"),
                "method_params": m.get("method_params") or None, "chat_format": m.get("chat_format")}

    def model_path(self, path_name: str) -> str:
        """The model file the cache was made with, when it is still where it was; else SavedCacheError."""
        rec = self.header.get("model") or {}
        cand = rec.get("path")
        if cand and Path(cand).is_file():
            return cand
        raise SavedCacheError(f"{path_name} was made with {rec.get('file', '?')} "
                              f"(sha256 {str(rec.get('sha256'))[:12]}...), which is not at {cand}; "
                              "pass model=<path or models.txt name>")
