"""Saved compressed caches of ingested documents, so a document reloads instantly instead of re-ingesting.

Layout under :func:`docs_root` (``$KVMERGE_DOCS`` or ``~/.cache/kvmerge-local/docs``): one folder per
(document bytes, settings) pair, holding ``cache.kvm`` (written by ``Session.save``) and ``meta.json``
(written last, so a half-saved entry is never listed).  ``meta.json`` says which upload and settings an entry is
for (key, name, digest, settings, date); the document's stats and pages shown in the list and the gauge are read
from the cache file itself, through :meth:`DocumentCache.read_meta
<kvmerge_local.engine.cache.DocumentCache.read_meta>` (its header only).  ``meta.json`` still records the stats
and pages it always did, so the files stay as they were.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import Settings

log = logging.getLogger(__name__)

META = "meta.json"
CACHE = "cache.kvm"


def docs_root() -> Path:
    """Where saved caches live: ``$KVMERGE_DOCS`` or ``~/.cache/kvmerge-local/docs``."""
    env = os.environ.get("KVMERGE_DOCS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvmerge-local" / "docs"


@dataclass
class SavedDoc:
    """One saved cache: the document it came from, the settings, and its stats at save time."""

    key: str
    name: str
    digest: str
    settings: Settings
    created: float
    stats: dict[str, Any] = field(default_factory=dict)
    pages: list[tuple[int, int, int]] = field(default_factory=list)
    folder: Path = Path()

    @property
    def cache_path(self) -> Path:
        return self.folder / CACHE

    def label(self) -> str:
        """Dropdown label: name, token count, method/budget, model, date."""
        tokens = self.stats.get("tokens_ingested")
        tok = f" · {tokens:,} tokens" if isinstance(tokens, int) else ""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))
        return f"{self.name}{tok} · {self.settings.describe()} · {when}"

    def to_json(self) -> dict:
        return {"key": self.key, "name": self.name, "digest": self.digest, "created": self.created,
                "settings": dataclasses.asdict(self.settings), "stats": self.stats,
                "pages": [list(p) for p in self.pages]}

    @classmethod
    def from_json(cls, d: dict, folder: Path, info: Any = None) -> "SavedDoc":
        """The entry in ``meta.json``'s dict ``d``; ``info`` (a :class:`~kvmerge_local.engine.saved.SavedInfo`,
        the cache file's header) supplies the stats and pages when given."""
        stats = info.stats if info is not None else d.get("stats", {})
        pages = info.pages if info is not None else d.get("pages", [])
        return cls(key=str(d["key"]), name=str(d["name"]), digest=str(d["digest"]), created=float(d["created"]),
                   settings=Settings(**d["settings"]), stats=dict(stats),
                   pages=[(int(a), int(b), int(c)) for a, b, c in pages], folder=folder)


class Library:
    """The saved caches under one folder (created on first save)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else docs_root()

    @staticmethod
    def key_for(digest: str, settings: Settings) -> str:
        return f"{digest[:16]}-{settings.fingerprint()}"

    def get(self, key: str) -> SavedDoc | None:
        """The entry ``key`` when it is complete on disk and its cache's header reads, else None."""
        if not key or "/" in key or key.startswith("."):
            return None
        folder = self.root / key
        try:
            entry = json.loads((folder / META).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable saved document %s: %s", folder, e)
            return None
        if not (folder / CACHE).exists():
            return None
        from kvmerge_local.engine.cache import DocumentCache  # noqa: PLC0415 (importing the UI loads no engine)

        try:
            return SavedDoc.from_json(entry, folder, DocumentCache.read_meta(folder / CACHE))
        except (OSError, ValueError, KeyError, TypeError) as e:  # SavedCacheError is a ValueError
            log.warning("ignoring unreadable saved document %s: %s", folder, e)
            return None

    def find(self, digest: str, settings: Settings) -> SavedDoc | None:
        """The saved cache of these document bytes under these settings, if any."""
        return self.get(self.key_for(digest, settings))

    def list(self) -> list[SavedDoc]:
        """Complete entries, newest first."""
        if not self.root.is_dir():
            return []
        docs = [d for d in (self.get(p.name) for p in self.root.iterdir() if p.is_dir()) if d is not None]
        return sorted(docs, key=lambda d: d.created, reverse=True)

    def save(self, session, *, name: str, digest: str, settings: Settings, stats: dict) -> SavedDoc:
        """Save ``session``'s document cache (``session.cache``: its pages are listed with the entry) as the
        entry for (digest, settings), replacing an older one."""
        key = self.key_for(digest, settings)
        folder = self.root / key
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        doc = SavedDoc(key=key, name=name, digest=digest, settings=settings, created=time.time(),
                       stats=_jsonable(stats), pages=[tuple(map(int, p)) for p in session.cache.pages], folder=folder)
        try:
            session.save(doc.cache_path)
            tmp = folder / (META + ".tmp")
            tmp.write_text(json.dumps(doc.to_json(), indent=1))
            tmp.replace(folder / META)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return doc

    def remove(self, key: str) -> bool:
        """Delete an entry; False when there was none."""
        doc = self.get(key)
        if doc is None:
            return False
        shutil.rmtree(doc.folder)
        return True


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # NumPy scalar
            out[k] = v.item()
        else:
            out[k] = str(v)
    return out
