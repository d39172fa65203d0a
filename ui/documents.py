"""Checks on an upload before the engine's reader sees it: type and size (the UI's own limits).

Content checks (empty text, encrypted or scanned PDFs, non-UTF-8 text) are the engine's
(:func:`kvmerge_local.engine.documents.load_document`), whose ``DocumentError`` messages the app shows as is.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MAX_MB = 50.0


def suffixes() -> tuple[str, ...]:
    """File types the engine reads (``.pdf``, ``.txt``, ``.md``...)."""
    from kvmerge_local.engine.documents import PDF_SUFFIXES, TEXT_SUFFIXES

    return tuple(PDF_SUFFIXES) + tuple(TEXT_SUFFIXES)


class UploadError(ValueError):
    """An upload the app refuses before reading it; the message says why and what to do."""


def check_upload(path: str | Path, *, max_mb: float = DEFAULT_MAX_MB, display_name: str | None = None) -> Path:
    """Type, presence, non-empty and the size limit; returns the path or raises :class:`UploadError`.

    ``display_name`` is the name the user knows (uploads arrive under temporary names).
    """
    p = Path(path)
    name = display_name or p.name
    suffix = p.suffix.lower()
    ok = suffixes()
    if suffix not in ok:
        raise UploadError(f"{name}: unsupported file type {suffix or '(none)'} — upload a PDF, TXT or MD file "
                          f"({', '.join(ok)}).")
    if not p.is_file():
        raise UploadError(f"{name}: the upload did not arrive; try again.")
    size = p.stat().st_size
    if size == 0:
        raise UploadError(f"{name} is empty (0 bytes).")
    if size > max_mb * 1024 * 1024:
        raise UploadError(f"{name} is {size / 2**20:.1f} MB, over the {max_mb:g} MB upload limit.")
    return p
