"""Documents: plain text, ``.txt``/``.md`` files and PDFs (pypdf), with page markers and page spans.

``load_document(source)`` returns a :class:`Document`: the text to ingest and, for PDFs, the character
span of every page.  Each PDF page starts with a marker line ``[Page N]`` so that answers can cite pages;
after tokenization :func:`page_token_spans` turns character spans into token spans for the UI.

Refused with :class:`DocumentError` (a clear message, nothing else touched): a missing file, an unknown
extension, an empty text, an unreadable PDF, an encrypted PDF (one that does not open with the empty
password), and a PDF without extractable text (scanned images: run OCR first).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import KVMergeError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
PDF_SUFFIXES = (".pdf",)


class DocumentError(KVMergeError, ValueError):
    """A document that cannot be ingested (empty, unreadable, encrypted, scanned, unsupported type)."""


@dataclass
class Document:
    """Text to ingest.  ``pages``: ``(page_number, char_start, char_end)`` of each page in ``text``
    (1-based page numbers, end exclusive; empty for plain text).  ``sha256``: of the source bytes."""

    text: str
    name: str = "text"
    pages: list[tuple[int, int, int]] = field(default_factory=list)
    sha256: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError("Document.text must be a str")
        if not self.text.strip():
            raise DocumentError(f"{self.name}: the document is empty (no text to ingest)")
        for n, a, b in self.pages:
            if not (0 <= a <= b <= len(self.text)) or n < 1:
                raise ValueError(f"bad page span {(n, a, b)} for a text of {len(self.text)} characters")
        if not self.sha256:
            self.sha256 = hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load_document(source: str | os.PathLike) -> Document:
    """A :class:`Document` from ``source``: a ``str`` is the text itself; a path (``os.PathLike``) is read
    by extension (.txt/.md as UTF-8, .pdf with pypdf)."""
    if isinstance(source, Document):
        return source
    if isinstance(source, str):
        if len(source) < 1024 and "\n" not in source and source.lower().endswith(TEXT_SUFFIXES + PDF_SUFFIXES) \
                and Path(source).is_file():
            log.warning("ingesting the string %r as text; pass a pathlib.Path to read the file", source)
        return Document(text=_clean(source), name="text")
    if not isinstance(source, os.PathLike):
        raise TypeError(f"document must be a str (the text) or a path, got {type(source).__name__}")
    p = Path(source)
    if not p.is_file():
        raise DocumentError(f"document not found: {p}")
    suffix = p.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return _load_pdf(p)
    if suffix in TEXT_SUFFIXES:
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DocumentError(f"{p.name} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                "convert it to UTF-8") from exc
        if "\x00" in text:
            raise DocumentError(f"{p.name} looks binary (NUL bytes), not a text file")
        return Document(text=_clean(text), name=p.name, sha256=hashlib.sha256(raw).hexdigest())
    raise DocumentError(f"{p.name}: unsupported document type '{suffix or '(none)'}'; supported: "
                        f"{', '.join(TEXT_SUFFIXES + PDF_SUFFIXES)}")


def _clean(text: str) -> str:
    """Normalize newlines and strip trailing whitespace (so the question seam starts on a fresh token)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _load_pdf(p: Path) -> Document:
    try:
        from pypdf import PdfReader  # noqa: PLC0415
        from pypdf.errors import PdfReadError  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - pypdf is a declared dependency
        raise DocumentError("reading PDFs needs pypdf (pip install pypdf)") from exc
    raw = p.read_bytes()
    try:
        reader = PdfReader(p)
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception as exc:  # unsupported encryption algorithms raise here
                raise DocumentError(f"{p.name} is an encrypted PDF that cannot be opened ({exc}); "
                                    "save an unencrypted copy first") from exc
            if not ok:
                raise DocumentError(f"{p.name} is an encrypted PDF (password protected); "
                                    "save an unencrypted copy first")
        pages = [(pg.extract_text() or "") for pg in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentError(f"{p.name} is not a readable PDF ({type(exc).__name__}: {exc})") from exc
    if not pages:
        raise DocumentError(f"{p.name} is an empty PDF (no pages)")
    if not any(t.strip() for t in pages):
        raise DocumentError(f"{p.name} has {len(pages)} page(s) but no extractable text (a scanned PDF?); "
                            "run OCR on it first (e.g. ocrmypdf)")
    parts, spans, n = [], [], 0
    for i, t in enumerate(pages, start=1):
        body = _clean(t)
        block = f"[Page {i}]\n{body}" if body else f"[Page {i}]"
        if parts:
            n += 2  # the "\n\n" joining pages
        spans.append((i, n, n + len(block)))
        parts.append(block)
        n += len(block)
    text = "\n\n".join(parts)
    log.info("%s: %d pages, %d characters", p.name, len(pages), len(text))
    return Document(text=text, name=p.name, pages=spans, sha256=hashlib.sha256(raw).hexdigest())


def token_char_ends(model, tokens: np.ndarray) -> np.ndarray:
    """int64[n]: for each token, the end offset (in characters of the detokenized text) of its piece."""
    lens = np.fromiter((len(model.piece(int(t))) for t in tokens), dtype=np.int64, count=len(tokens))
    return np.cumsum(lens)


def page_token_spans(model, tokens: np.ndarray, text_offset: int, text: str,
                     pages: list[tuple[int, int, int]], first_token: int = 0) -> list[tuple[int, int, int]]:
    """``(page_number, first_token, last_token)`` (inclusive, absolute token indices) of each page.

    ``tokens``: int32[n] the tokens of ``head + text`` (without BOS), whose first token has absolute
    index ``first_token``; ``text_offset``: ``len(head.encode("utf-8"))``; ``pages``: character spans in ``text``.  Token
    piece lengths are measured in UTF-8 bytes and mapped back to characters; a leading space added by the
    tokenizer is detected and skipped.
    """
    if not pages or len(tokens) == 0:
        return []
    ends = token_char_ends(model, tokens)  # bytes
    total = len(text.encode("utf-8")) + text_offset
    shift = int(ends[-1]) - total  # > 0: a space prefix added by the tokenizer
    out = []
    for n, a, b in pages:
        ba = text_offset + len(text[:a].encode("utf-8")) + shift
        bb = text_offset + len(text[:b].encode("utf-8")) + shift
        t0 = int(np.searchsorted(ends, ba, side="right"))
        t1 = int(np.searchsorted(ends, bb, side="left"))
        t0, t1 = min(t0, len(tokens) - 1), min(max(t1, t0), len(tokens) - 1)
        out.append((n, first_token + t0, first_token + t1))
    return out
