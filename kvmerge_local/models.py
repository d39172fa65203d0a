"""The model registry (``models.txt``), model resolution and downloads.

``models.txt`` (repository root, also looked up beside the package) has one model per line, whitespace
separated: ``name  hf_repo  file  sha256  size_bytes  chat_format  n_ctx_train``.  A value that was not
verified against Hugging Face is either the literal ``unverified`` (unknown) or ends in ``?`` (our best
knowledge, not checked); :func:`pull` warns about both and only verifies a sha256 that is known.

Downloads go to ``$KVMERGE_MODELS`` or ``~/.cache/kvmerge-local/models``; the server is
``$KVMERGE_HF_BASE`` (default ``https://huggingface.co``), files at ``{base}/{repo}/resolve/main/{file}``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import KVMergeError, ModelError

log = logging.getLogger(__name__)

UNVERIFIED = "unverified"
DATA_DIR = Path(__file__).resolve().parent / "data"
_NON_MODELS = {"llama2-vocab.gguf"}


def models_dir() -> Path:
    """Where downloaded models live: ``$KVMERGE_MODELS`` or ``~/.cache/kvmerge-local/models``."""
    return Path(os.environ.get("KVMERGE_MODELS") or Path.home() / ".cache" / "kvmerge-local" / "models")


def registry_path() -> Path:
    """``$KVMERGE_MODELS_TXT``, else ``models.txt`` at the repository root (beside the package)."""
    env = os.environ.get("KVMERGE_MODELS_TXT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models.txt"


def _known(v: str) -> bool:
    return v != UNVERIFIED and not v.endswith("?")


@dataclass(frozen=True)
class ModelEntry:
    """One line of ``models.txt`` (fields as written, ``?`` suffixes kept; see :meth:`value`)."""

    name: str
    repo: str
    file: str
    sha256: str
    size: str
    chat_format: str
    n_ctx_train: str

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"bad model name {self.name!r}")
        s = self.sha256.rstrip("?")
        if self.sha256 != UNVERIFIED and (len(s) != 64 or any(c not in "0123456789abcdef" for c in s)):
            raise ValueError(f"{self.name}: sha256 must be 64 hex digits or '{UNVERIFIED}', got {self.sha256!r}")

    @staticmethod
    def value(v: str) -> str:
        """A field without its ``?`` marker."""
        return v.rstrip("?")

    @property
    def unverified_fields(self) -> list[str]:
        return [f for f in ("repo", "file", "sha256", "size", "chat_format", "n_ctx_train")
                if not _known(getattr(self, f))]

    @property
    def url(self) -> str:
        base = os.environ.get("KVMERGE_HF_BASE", "https://huggingface.co").rstrip("/")
        return f"{base}/{self.value(self.repo)}/resolve/main/{self.value(self.file)}"

    @property
    def local_path(self) -> Path:
        return models_dir() / self.value(self.file)

    def as_dict(self) -> dict:
        return {"name": self.name, "repo": self.repo, "file": self.file, "sha256": self.sha256, "size": self.size,
                "chat_format": self.chat_format, "n_ctx_train": self.n_ctx_train,
                "unverified": self.unverified_fields, "downloaded": self.local_path.is_file()}


def load_registry(path: str | os.PathLike | None = None) -> dict[str, ModelEntry]:
    """Parse ``models.txt``: name -> :class:`ModelEntry` (``#`` comments and blank lines skipped)."""
    p = Path(path) if path else registry_path()
    if not p.is_file():
        raise ModelError(f"model registry not found: {p}")
    out: dict[str, ModelEntry] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 7:
            raise ModelError(f"{p}:{i}: expected 7 fields (name repo file sha256 size chat_format n_ctx_train), "
                             f"got {len(parts)}")
        try:
            out[parts[0]] = ModelEntry(*parts)
        except ValueError as exc:
            raise ModelError(f"{p}:{i}: {exc}") from exc
    return out


DEFAULT_MODEL_FILE = "kvmerge-tiny.gguf"


def default_model() -> Path:
    """The embedded default model: ``kvmerge_local/data/kvmerge-tiny.gguf`` (written by
    ``kvmerge_local.train.export``), else any other model GGUF there (the vocab-only file excluded)."""
    found = sorted(p for p in DATA_DIR.glob("*.gguf") if p.name not in _NON_MODELS)
    if not found:
        raise ModelError(f"no embedded default model: {DATA_DIR / DEFAULT_MODEL_FILE} is missing (the trained "
                         "tiny model ships with the benchmark/training issue). Pass a model path or a models.txt "
                         "name (see `kvmerge-local models` and `kvmerge-local pull NAME`)")
    pref = [p for p in found if p.name == DEFAULT_MODEL_FILE]
    return (pref or found)[0]


def resolve_model(model: str | os.PathLike | None) -> tuple[Path, ModelEntry | None]:
    """A model argument -> (GGUF path, registry entry or None): None = the embedded default; an existing
    path; or a ``models.txt`` name (which must have been pulled)."""
    if model is None:
        return default_model(), None
    p = Path(model)
    if p.is_file():
        return p, None
    name = str(model)
    try:
        reg = load_registry()
    except ModelError:
        reg = {}
    if name in reg:
        e = reg[name]
        if not e.local_path.is_file():
            raise ModelError(f"model '{name}' is not downloaded yet ({e.local_path}); run `kvmerge-local pull {name}`")
        return e.local_path, e
    raise ModelError(f"model not found: {name!r} is neither a file nor a models.txt name "
                     f"(known: {', '.join(reg) or 'none'})")


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (cached per path, size and mtime for this process)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


class _Progress:
    """tqdm when installed, else a plain percentage line on stderr."""

    def __init__(self, total: int | None, desc: str, enabled: bool) -> None:
        self.n, self.total, self.desc, self.enabled, self._last = 0, total, desc, enabled, -1
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm  # noqa: PLC0415

                self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and self.total:
            pct = int(100 * self.n / self.total)
            if pct != self._last:
                self._last = pct
                print(f"\r{self.desc}: {pct}%", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def pull(name: str, *, dest: str | os.PathLike | None = None, registry: str | os.PathLike | None = None,
         progress: bool = True, timeout: float = 30.0) -> Path:
    """Download model ``name`` of the registry into ``dest`` (default :func:`models_dir`), verifying its
    sha256 when known; returns the file's path.  A partial download is kept as ``*.part`` and removed on a
    checksum mismatch."""
    reg = load_registry(registry)
    if name not in reg:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(reg)}")
    e = reg[name]
    if e.unverified_fields:
        log.warning("%s: unverified registry fields: %s", name, ", ".join(e.unverified_fields))
    out_dir = Path(dest) if dest else models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / e.value(e.file)
    part = target.with_name(target.name + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(e.url, timeout=timeout) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = _Progress(total, name, progress)
            try:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
    except (urllib.error.URLError, OSError) as exc:
        raise KVMergeError(f"download of {name} from {e.url} failed: {exc}") from exc
    got = h.hexdigest()
    if _known(e.sha256):
        if got != e.sha256:
            part.unlink(missing_ok=True)
            raise KVMergeError(f"{name}: sha256 mismatch (expected {e.sha256}, got {got}); the download was removed")
    else:
        log.warning("%s: sha256 %s could not be verified (registry says %s)", name, got, e.sha256)
    os.replace(part, target)
    _sha256_cached.cache_clear()
    log.info("downloaded %s to %s (sha256 %s)", name, target, got)
    return target
