"""A real browser on the app: Debian's chromium driven by Playwright (never a downloaded browser) loads the
page, uploads a PDF, asks, sees the answer and the gauge, and leaves a screenshot in the test's tmp dir."""
from __future__ import annotations

import os
import re
import shutil

import pytest

from test_ui_support import STORY, TIMEOUT, make_pdf, norm, served_app

pytestmark = [pytest.mark.llama, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:unclosed event loop:ResourceWarning"),  # Gradio's server threads
              pytest.mark.filterwarnings("ignore:::gradio.queueing")]  # pandas deprecations inside Gradio

CHROMIUM = os.environ.get("KVMERGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "Who kept the log?"
N_NEW = 16


@pytest.fixture(scope="module")
def browser():
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: install Debian's package (`make browser`, as root with apt) "
                    "or set KVMERGE_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                   "(pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_upload_ask_and_see_the_answer(browser, tiny_llama_small, tmp_path):
    from kvmerge_local import Session
    from kvmerge_local.ui.choices import Settings

    pdf = make_pdf(tmp_path / "lighthouse.pdf", STORY)
    with Session.open(str(tiny_llama_small), n_threads=1, **Settings().open_kwargs()) as s:  # the app's defaults
        tokens = s.ingest(pdf).tokens_ingested
        expected = norm("".join(s.ask(QUESTION, max_new_tokens=N_NEW)))
    word = max(re.findall(r"[A-Za-z]{3,}", expected) or [""], key=len)
    assert word, f"the reference answer {expected!r} has no word to look for"

    ms = int(TIMEOUT * 1000)
    with served_app(tiny_llama_small, tmp_path / "saved", max_new_tokens=N_NEW) as app:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(ms)
        elsewhere: list[str] = []  # a local document app asks nothing of other hosts (fonts, CDNs, telemetry)
        page.on("request", lambda r: None if r.url.startswith((app.local_url.rstrip("/"), "data:", "blob:"))
                else elsewhere.append(r.url))
        page.goto(app.local_url)
        page.wait_for_selector("#kvm-gauge :text('No document yet')")

        page.locator("#kvm-file input[type=file]").set_input_files(str(pdf))  # ingestion starts on upload
        page.wait_for_selector("#kvm-status :text('ingested lighthouse.pdf')")
        gauge = page.locator("#kvm-gauge").inner_text()
        assert f"{tokens:,}" in gauge and "3 pages" in gauge, gauge
        assert page.locator("#kvm-plot svg").count() == 1
        assert "lighthouse.pdf" in page.locator("#kvm-docs").inner_text() or \
            "lighthouse.pdf" in page.locator("#kvm-docs input").input_value()

        page.locator("#kvm-question textarea").fill(QUESTION)
        page.locator("#kvm-ask").click()
        page.wait_for_selector("#kvm-gauge :text('last answer')")  # the answer finished, stats updated
        user = page.locator("#kvm-chat [data-testid='user']").last.inner_text()
        bot = page.locator("#kvm-chat [data-testid='bot']").first.inner_text()
        assert user.strip() == QUESTION
        assert word in bot, (word, bot)
        assert page.locator("#kvm-question textarea").input_value() == ""
        assert elsewhere == []

        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
        page.close()
