"""Helpers shared by the UI tests (no tests here): a PDF writer, a served app, message text."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Iterator

TIMEOUT = 60.0
"""Seconds any single UI request may take in the tests (a hang fails instead of blocking the suite)."""


def make_pdf(path: Path, pages: list[str]) -> Path:
    """Write a plain PDF (Helvetica, one text block per page) whose text pypdf extracts."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objs: list[bytes] = []
    n = len(pages)
    font_id = 3 + 2 * n
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    for i, text in enumerate(pages):
        lines, line = [], ""
        for word in text.split():
            if len(line) + len(word) > 80:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        body = "BT /F1 11 Tf 72 740 Td 14 TL " + " ".join(f"({esc(ln)}) '" for ln in lines) + " ET"
        stream = body.encode("latin-1")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 {font_id} "
                    f"0 R >> >> /Contents {4 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + o + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{off:010d} 00000 n \n".encode() for off in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
    return path


STORY = [
    "The lighthouse keeper Mara Okafor kept a log of every ship that passed the northern cape. "
    "In the spring of the first year she counted forty two fishing boats and one ferry.",
    "On the second page of the log Mara noted that the fog horn failed during the storm of March. "
    "She repaired it herself using a spare diaphragm from the supply room.",
    "The final entry records that the lamp was converted to electric power and that Mara retired "
    "to the village of Port Ellen, where she opened a small bookshop.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served_app(model: Path, docs_dir: Path, **kw: Any) -> Iterator[Any]:
    """The UI serving ``model`` (the real engine) on 127.0.0.1 at a free port; closed afterwards."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from kvmerge_local.ui.app import launch

    kw.setdefault("n_threads", 1)
    app = launch(model=str(model), port=free_port(), docs_dir=docs_dir, block=False, quiet=True, **kw)
    try:
        yield app
    finally:
        app.close()
        app.workbench.close()


def text_of(message: dict) -> str:
    """The text of a chatbot message as gradio_client returns it (str or a list of typed parts)."""
    c = message.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    if isinstance(c, dict):
        return str(c.get("text", ""))
    return ""


def norm(text: str) -> str:
    """Whitespace collapsed: Gradio's chatbot expands tabs and dedents lines of the text it shows."""
    return " ".join(text.split())


def answers(messages: list[dict]) -> list[str]:
    """The answers (assistant messages without a metadata title) of a chatbot value, whitespace collapsed."""
    return [norm(text_of(m)) for m in messages
            if m.get("role") == "assistant" and not (m.get("metadata") or {}).get("title")]
