"""The chat page served at `/` works in a real browser against the OpenAI-compatible server.

Drives headless Debian Chromium through Playwright, using the system browser rather than
`playwright install` (which downloads browsers).
"""
from __future__ import annotations

import shutil

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 60_000   # a CPU-only tiny model on a shared CI machine can be slow to answer


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian chromium not installed: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def chat_page(browser, openai_server):
    """The chat page, loaded, with the server's model listed in the model picker."""
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(openai_server.url + "/")
    page.wait_for_function(
        "model => [...document.querySelectorAll('#model option')].some(o => o.value === model)",
        arg=openai_server.model,
    )
    page.select_option("#model", openai_server.model)
    page.fill("#max-tokens", "16")
    yield page
    page.close()


@pytest.mark.slow
def test_chat_page_streams_a_reply_from_the_server(chat_page):
    chat_page.fill("#prompt", "Tell me a story.")
    chat_page.click("#send")

    reply = chat_page.wait_for_selector(".message.assistant[data-done='true']")
    assert chat_page.inner_text(".message.user") == "Tell me a story."
    assert reply.inner_text().strip(), "the assistant message is empty"
    assert int(reply.get_attribute("data-chunks")) > 1, "the reply did not arrive as a stream"
    assert not chat_page.locator(".error").is_visible(), chat_page.locator(".error").all_inner_texts()


@pytest.mark.slow
def test_chat_page_shows_the_servers_error_for_an_unknown_model(chat_page):
    chat_page.evaluate(
        "() => { const s = document.getElementById('model');"
        " s.add(new Option('no-such-model', 'no-such-model')); s.value = 'no-such-model'; }"
    )
    chat_page.fill("#prompt", "Hello?")
    chat_page.press("#prompt", "Enter")

    error = chat_page.wait_for_selector(".error", state="visible")
    assert "no-such-model" in error.inner_text()
