"""Hostile text typed into the pages never runs: live text, the head explorer, explanation
edits and deep links show it literally (tokens with textContent, explanations through
autoescape); ``window.__xss`` stays undefined and no dialog opens. Also: the browser's
token display agrees with the server's, and the live view works from the keyboard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from kronscope.web.templating import visible_token
from web.test_views import TOKEN_CASES

from .conftest import Server, Watch, make_checkpoint, sign_in

HOSTILE = "<img src=x onerror=window.__xss=1>"
SCRIPTED = "<script>window.__xss=2</script>"


@pytest.fixture(scope="module")
def sae(server: Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An SAE uploaded through the API (no harvest needed for live text and explanations)."""
    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "kron", seed=7)
    files = [
        ("files", (f"kron/{p.name}", p.read_bytes(), "application/octet-stream"))
        for p in sorted(Path(folder).iterdir())
    ]
    for _ in range(3):  # a client honours 503 + Retry-After (SQLite busy under load)
        response = httpx.post(
            f"{server.url}/api/v1/saes",
            files=files,
            data={"slug": "xss-kron"},
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=60,
        )
        if response.status_code != 503:
            break
        time.sleep(float(response.headers.get("retry-after", "1")))
    assert response.status_code == 201, response.text
    return "xss-kron"


def wait_for_tokens(page: Any, box: str = "#live-tokens") -> None:
    """Wait until the text's tokens are shown, or fail with the page's own error message."""
    page.wait_for_function(
        "(box) => document.querySelector(box + ' button.tok')"
        " || document.querySelector('.form-status.error')",
        arg=box,
        timeout=90_000,
    )
    error = page.locator(".form-status.error")
    assert error.count() == 0, error.first.inner_text()


def _no_xss(page: Any, watch: Watch) -> None:
    assert page.evaluate("() => typeof window.__xss") == "undefined"
    assert watch.dialogs == []
    assert page.locator("main img").count() == 0


def test_live_text_shows_hostile_text_literally(
    page: Any, server: Server, sae: str, watch: Watch
) -> None:
    page.goto(f"{server.url}/saes/{sae}/live")
    page.get_by_label("Text", exact=True).fill(f"{HOSTILE}\n\tend")
    page.get_by_role("button", name="Run").click()
    wait_for_tokens(page)
    tokens = page.locator("#live-tokens button.tok")
    shown = "".join(tokens.all_text_contents())
    assert "<img" in shown and "onerror" in shown
    assert "↵" in shown and "⇥" in shown  # whitespace made visible
    tokens.nth(1).click()
    page.locator("#token-latents").wait_for()
    assert "position 1" in page.locator("#token-detail").inner_text()
    _no_xss(page, watch)
    # The deep link carries the text and shows it literally again.
    assert "text=" in page.url
    page.goto(page.url)
    wait_for_tokens(page)
    assert page.get_by_label("Text", exact=True).input_value().startswith(HOSTILE)
    _no_xss(page, watch)


def test_deep_links_with_hostile_text_stay_text(
    page: Any, server: Server, sae: str, watch: Watch
) -> None:
    for path in (
        f"/saes/{sae}/heads/0?text={quote(HOSTILE)}",
        f"/search?sae={sae}&text={quote(SCRIPTED)}&q={quote(HOSTILE)}",
        f"/saes/{sae}/live#text={quote(SCRIPTED)}",
    ):
        page.goto(server.url + path)
        page.wait_for_load_state("networkidle")
        _no_xss(page, watch)
    assert page.get_by_label("Text", exact=True).input_value() == SCRIPTED


def test_explanation_edits_show_hostile_text_literally(
    page: Any, server: Server, sae: str, watch: Watch
) -> None:
    sign_in(page, server)
    page.goto(f"{server.url}/saes/{sae}/latents/3")
    page.get_by_label("Add an explanation").fill(HOSTILE)
    page.get_by_role("button", name="Save explanation").click()
    page.wait_for_function(
        "() => document.querySelector('.expl-text') || document.querySelector('.form-status.error')"
    )
    error = page.locator(".form-status.error")
    assert error.count() == 0, error.first.inner_text()
    assert page.locator(".expl-text").first.text_content() == HOSTILE
    page.get_by_role("button", name="Edit").first.click()
    page.get_by_label("Edit explanation").fill(SCRIPTED)
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_function(
        "() => document.querySelector('.expl-text').textContent.includes('script')"
    )
    assert page.locator(".expl-text").first.text_content() == SCRIPTED
    page.get_by_text("History (2 versions)").click()
    history = page.locator("details.history").first.inner_text()
    assert HOSTILE in history and SCRIPTED in history
    _no_xss(page, watch)
    # Search results show it as text too.
    page.goto(f"{server.url}/search?q=xss")
    assert SCRIPTED in page.locator("ol.results").inner_text()
    _no_xss(page, watch)


def test_browser_token_display_matches_the_server(page: Any, server: Server) -> None:
    page.goto(f"{server.url}/")
    tokens = [t for t, _ in TOKEN_CASES]
    shown = page.evaluate(
        "async (tokens) => { const m = await import('/static/js/tokens.js');"
        " return tokens.map((t) => m.visibleToken(t)); }",
        tokens,
    )
    assert shown == [visible_token(t) for t in tokens]


def test_live_text_works_from_the_keyboard(page: Any, server: Server, sae: str) -> None:
    page.goto(f"{server.url}/saes/{sae}/live?text=The%20cat%20sat")
    wait_for_tokens(page)
    first = page.locator("#live-tokens button.tok").first
    first.focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.locator("#token-latents").wait_for()
    assert page.locator("#live-tokens button.tok[aria-pressed=true]").count() == 1
    outline = page.evaluate(
        "() => getComputedStyle(document.activeElement, ':focus-visible').outlineStyle"
    )
    assert outline != "none"
