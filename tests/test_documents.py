"""Documents: text, markdown and PDF (pypdf) with page markers and page token spans; bad files refused."""
from __future__ import annotations

from pathlib import Path

import pytest
from pypdf import PdfWriter

from kvmerge_local.engine.documents import DocumentError, load_document

SAMPLE = Path(__file__).resolve().parent.parent / "kvmerge_local" / "data" / "sample.pdf"


def test_text_and_markdown(tmp_path):
    d = load_document("  Hello\r\nworld  ")
    assert d.text == "Hello\nworld" and d.pages == [] and len(d.sha256) == 64
    md = tmp_path / "a.md"
    md.write_text("# Title\n\nBody text.\n", encoding="utf-8")
    d = load_document(md)
    assert d.text == "# Title\n\nBody text." and d.name == "a.md"
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf8")
    with pytest.raises(DocumentError, match="not UTF-8"):
        load_document(bad)


def test_sample_pdf_has_page_markers():
    d = load_document(SAMPLE)
    assert [p[0] for p in d.pages] == [1, 2, 3]
    for n, a, b in d.pages:
        assert d.text[a:b].startswith(f"[Page {n}]\n")
    assert "Lake Varnett" in d.text[d.pages[0][1]:d.pages[0][2]]
    assert "Recommendations" in d.text[d.pages[2][1]:d.pages[2][2]]


def _pdf(path: Path, pages: int = 1, password: str | None = None) -> Path:
    w = PdfWriter()
    for _ in range(pages):
        w.add_blank_page(width=200, height=200)
    if password:
        w.encrypt(password, algorithm="RC4-128")
    with open(path, "wb") as f:
        w.write(f)
    return path


def test_bad_pdfs(tmp_path):
    with pytest.raises(DocumentError, match="no extractable text"):
        load_document(_pdf(tmp_path / "scan.pdf", 2))
    with pytest.raises(DocumentError, match="empty PDF"):
        load_document(_pdf(tmp_path / "empty.pdf", 0))
    with pytest.raises(DocumentError, match="encrypted"):
        load_document(_pdf(tmp_path / "enc.pdf", 1, password="secret"))
    junk = tmp_path / "junk.pdf"
    junk.write_bytes(b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(DocumentError, match="not a readable PDF|no pages|empty PDF"):
        load_document(junk)
    with pytest.raises(DocumentError, match="unsupported document type"):
        load_document(_ext(tmp_path))
    with pytest.raises(DocumentError, match="not found"):
        load_document(tmp_path / "missing.pdf")


def _ext(tmp_path: Path) -> Path:
    p = tmp_path / "file.docx"
    p.write_bytes(b"PK")
    return p


@pytest.mark.llama
def test_page_token_spans_cover_the_pages(tiny_model_factory):
    from kvmerge_local import Session

    with Session.open(tiny_model_factory(), n_ctx=2048, budget=1.0, n_threads=2) as s:
        st = s.ingest(SAMPLE)
        pages = s.pages
        assert [p[0] for p in pages] == [1, 2, 3]
        assert pages[0][1] >= 1 and pages[-1][2] == st.tokens_ingested - 1
        toks = s.model.tokenize(s.fmt.doc_head + load_document(SAMPLE).text, add_bos=True)
        for n, a, b in pages:
            assert a <= b
            text = b"".join(s.model.piece(int(t)) for t in toks[a:b + 1]).decode("utf-8", "replace")
            assert text.lstrip().startswith(f"[Page {n}]"), (n, text[:30])
        assert all(pages[i][2] < pages[i + 1][1] for i in range(2))
