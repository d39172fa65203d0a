"""DocumentCache: the one object that owns a session's document cells, positions, evidence, size and file."""
from __future__ import annotations

import numpy as np
import pytest

from kvmerge_local import Session
from kvmerge_local.bridge import KVGeometry
from kvmerge_local.engine import DocumentCache, SavedCacheError

pytestmark = pytest.mark.llama

TEXT = " ".join(["the river runs north past the stone house where light falls on paper"] * 40) + "."


@pytest.fixture(scope="module")
def session(tiny_model_factory):
    s = Session.open(tiny_model_factory(vocab="llama2-small", n_vocab=4096, n_ctx_train=512), n_ctx=256,
                     n_threads=2, position_policy="reindex")
    s.ingest(TEXT)
    yield s
    s.close()


def test_cache_is_what_the_session_reports(session):
    c, st = session.cache, session.stats
    assert c.n_cells == st.doc_cells == st.cells_in_use and c.n_tokens == st.tokens_ingested
    assert c.nbytes == st.kv_bytes_now == c.n_cells * session.bytes_per_cell
    assert (c.n_compactions, c.n_reindex) == (st.n_compactions, st.n_reindex) and c.n_reindex >= 1
    assert c.doc_pos.shape == c.rope_pos.shape == c.evidence.shape == (2, 2, c.n_cells)
    np.testing.assert_array_equal(c.rope_pos, np.broadcast_to(np.arange(c.n_cells), c.rope_pos.shape))  # re-indexed
    assert c.end() == c.n_cells == session.ctx.n_past
    np.testing.assert_array_equal(np.sort(session.bridge.cell_positions()), np.arange(c.n_cells))


def test_state_round_trip(session):
    c = session.cache
    back = DocumentCache.from_state(c.state, c.meta_state, c.geom, c.k_type, c.v_type)
    for name in ("doc_pos", "rope_pos", "evidence"):
        np.testing.assert_array_equal(getattr(back, name), getattr(c, name))
        assert not np.shares_memory(getattr(back, name), getattr(c, name))
    assert back.meta_state == c.meta_state and back.nbytes == c.nbytes
    with pytest.raises(ValueError, match="share one"):
        DocumentCache.from_state({**c.state, "evidence": c.evidence[:, :, 1:]}, c.meta_state, c.geom, c.k_type,
                                 c.v_type)


def test_save_load_file(session, tmp_path):
    c = session.cache
    path = session.save(tmp_path / "doc.kvm")
    back, st, meta = DocumentCache.load(path, c.geom)
    assert st.n_cells == c.n_cells and (back.k_type, back.v_type) == (c.k_type, c.v_type)
    np.testing.assert_array_equal(st.pos, np.arange(c.n_cells))
    np.testing.assert_array_equal(back.doc_pos, c.doc_pos)
    assert back.name == c.name and back.n_tokens == c.n_tokens and meta["method"] == session.method_name
    other = KVGeometry(c.geom.n_layer, c.geom.n_kv_head * 2, c.geom.head_dim)
    with pytest.raises(SavedCacheError, match="geometry"):
        DocumentCache.load(path, other)
    with pytest.raises(SavedCacheError, match="another model"):
        DocumentCache.load(path, c.geom, model_sha256="0" * 64, model_label="x")


def test_read_meta_reads_the_header_only(session, tmp_path):
    """What the UI's saved-document list shows comes from the cache file's header: the stats at save time, the
    document's pages and sizes, and the settings Session.load reopens it with; a broken file is refused."""
    path = session.save(tmp_path / "doc.kvm")
    info = DocumentCache.read_meta(path)
    c = session.cache
    assert (info.n_cells, info.n_tokens, info.name, info.sha256) == (c.n_cells, c.n_tokens, c.name, c.sha256)
    assert info.pages == [tuple(p) for p in c.pages]
    assert info.stats == session.stats.as_dict()
    assert info.open_kwargs()["n_ctx"] == 256 and info.open_kwargs()["position_policy"] == "reindex"
    assert info.model_path(path.name) == str(session.model.path.resolve())
    (tmp_path / "bad.kvm").write_bytes(b"not a cache at all")
    with pytest.raises(SavedCacheError, match="not a kvmerge-local document cache"):
        DocumentCache.read_meta(tmp_path / "bad.kvm")
