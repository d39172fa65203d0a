"""The long-document engine: sessions (ingest, compress-as-you-go, ask), documents, chat formats,
position re-indexing and saved document caches.  Importing this package loads nothing native."""
from .cache import DocumentCache
from .documents import Document, DocumentError, load_document
from .saved import SavedCacheError
from .session import POSITION_POLICIES, Session
from .stats import IngestProgress, Stats

__all__ = ["Session", "DocumentCache", "Stats", "IngestProgress", "Document", "DocumentError", "load_document", "SavedCacheError",
           "POSITION_POLICIES"]
