"""The web playground in a real headless Chromium against the real server."""

import contextlib
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])


@contextlib.contextmanager
def playground(checkpoint):
    """The playground page of a server of its own over ``checkpoint``: (server, page)."""
    from playwright.sync_api import sync_playwright

    from conftest import Server
    server = Server(checkpoint)
    try:
        with sync_playwright() as p:
            browser = launch(p)
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                yield server, page
            finally:
                browser.close()
    finally:
        server.stop()


def test_playground_streams_a_completion(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(server.url + "/")
            assert page.title() == "gptstack playground"
            assert page.locator("#model").inner_text() == "tiny"
            assert not page.locator("#classify").is_visible()      # a language model has no head
            page.fill("#key", "wrong-key")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('error')")
            assert "API key" in page.locator("#status").inner_text()

            page.fill("#key", server.key)
            page.fill("#prompt", "ROMEO:")
            page.fill("#max_tokens", "24")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30000)
            assert "24 tokens" in page.locator("#status").inner_text()
            assert len(page.locator("#completion").inner_text()) > 10
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_playground_classifies_with_a_classifier(tiny_classifier):
    with playground(tiny_classifier) as (server, page):
        page.fill("#key", server.key)
        page.fill("#prompt", "this movie was wonderful , the plot too")
        page.click("#classify")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                               timeout=30000)
        text = page.locator("#output").inner_text()
        assert text.startswith("label 1") and "0: 0." in text and "1: " in text
