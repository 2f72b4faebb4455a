"""A person's whole journey in a real browser: enter a key, upload a checkpoint folder,
watch its harvest, browse latents, a latent, its parent, the head explorer, live text,
edit an explanation and search for it. Screenshots of every page at 1280 and 390 px go
to test-artifacts/screenshots/."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, make_checkpoint, sign_in
from .test_xss import wait_for_tokens

SLUG = "journey-kron"
HARVEST_TIMEOUT_MS = 150_000


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_checkpoint(tmp_path_factory.mktemp("upload") / "journey-checkpoint", seed=11)
    (Path(folder) / "README.md").write_text("not part of the checkpoint")  # left out by the page
    return Path(folder)


def _upload_and_harvest(
    page: Any, server: Server, folder: Path, shoot: Callable[[Any, str], None]
) -> None:
    page.goto(f"{server.url}/upload")
    page.set_input_files("#upload-folder", str(folder))
    chosen = page.locator("#upload-chosen")
    assert "cfg.json" in chosen.inner_text() and "1 other file left out" in chosen.inner_text()
    page.get_by_label("Slug").fill(SLUG)
    page.get_by_label("Tokens").fill("4096")
    page.get_by_label("Context length").fill("32")
    page.get_by_label("Examples per latent").fill("8")
    shoot(page, "upload-form")
    page.get_by_role("button", name="Upload").click()
    page.get_by_role("heading", name=f"Uploaded as {SLUG}").wait_for(timeout=60_000)
    page.wait_for_function(
        "() => { const done = document.querySelector('[data-job-done]');"
        " const err = document.querySelector('[data-job-error]');"
        " return (done && !done.hidden) || (err && !err.hidden); }",
        timeout=HARVEST_TIMEOUT_MS,
    )
    error = page.locator("[data-job-error]")
    assert error.is_hidden(), error.inner_text()
    assert page.locator("#upload-result .badge").inner_text() == "harvested"
    assert "tokens" in page.locator("[data-job-numbers]").inner_text()
    shoot(page, "upload-harvested")
    page.get_by_role("link", name=f"Browse {SLUG}").click()
    page.wait_for_url(f"{server.url}/saes/{SLUG}")


def test_upload_harvest_browse_explain_search(
    page: Any, server: Server, checkpoint_folder: Path, shoot: Callable[[Any, str], None]
) -> None:
    sign_in(page, server)
    assert page.locator(".key-link").inner_text() == "Key: browser"
    shoot(page, "home-empty")

    _upload_and_harvest(page, server, checkpoint_folder, shoot)

    # The SAE page: browse, sort by density, open the densest latent.
    assert page.locator("h1 .badge").inner_text() == "harvested"
    assert "of 64 latents" in page.locator(".table-title").inner_text()
    shoot(page, "sae")
    page.get_by_label("Sort by").select_option("density")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url(re.compile(r"sort=density"))
    densest = page.locator("table.latents tbody tr td:first-child a").first
    index = int(densest.inner_text())
    densest.click()

    # The latent page: examples and the composition panel.
    page.wait_for_url(f"{server.url}/saes/{SLUG}/latents/{index}")
    assert page.locator("h1").inner_text().startswith(f"Latent {index}")
    assert page.locator("#top-h + p.hint + ol li.example").count() > 0
    assert page.locator(".tokens .tok.max").count() > 0
    assert page.locator("section.composition .parent-card").count() == 2
    assert "Both parents fired" in page.locator(".and-numbers").text_content()
    assert page.locator("ol.logits li").count() > 0  # the harvest computed logit effects
    assert page.locator("#nb-h ~ .latent-table tbody tr").count() > 0  # and neighbours
    shoot(page, "latent")

    # Its base parent, then the head explorer.
    page.locator(".parent-card h3 a").first.click()
    page.wait_for_url(re.compile(r"/parents/base/\d+/\d+$"))
    assert page.locator("h1").inner_text().startswith("Base parent")
    assert page.locator("#children-h").is_visible()
    shoot(page, "parent")
    page.get_by_role("link", name=re.compile(r"^Head \d+ explorer$")).click()
    page.wait_for_url(re.compile(r"/heads/\d+$"))
    assert page.locator("#heatmap a.cell").count() == 8
    shoot(page, "head")
    page.get_by_label("Text", exact=True).fill("The cat sat on the mat")
    page.get_by_role("button", name="Show activations").click()
    wait_for_tokens(page, "#head-tokens")
    assert "largest value over the text" in page.locator("#grid-scale").inner_text()
    page.locator("#head-tokens button.tok").nth(2).click()
    assert "at token 2" in page.locator("#grid-scale").inner_text()
    page.get_by_role("button", name="All tokens (max)").click()
    assert "text=" in page.url  # the view is a deep link
    shoot(page, "head-text")
    page.locator("#heatmap a.cell").first.click()
    page.wait_for_url(re.compile(r"/latents/\d+$"))

    # Live text: tokens, a token's top latents, shading by a chosen latent, deep links.
    page.goto(f"{server.url}/saes/{SLUG}/live")
    page.get_by_label("Text", exact=True).fill("The quick brown fox jumps over the lazy dog.")
    page.get_by_role("button", name="Run").click()
    wait_for_tokens(page)
    page.locator("#live-tokens button.tok").nth(3).click()
    page.locator("#token-latents").wait_for()
    assert page.locator("#token-latents tbody tr").count() > 0
    page.locator("#token-latents tbody tr button.pick").first.click()
    page.wait_for_function("() => document.getElementById('live-latent').value !== ''")
    chosen = page.get_by_label("Shade by latent").input_value()
    page.wait_for_function(
        "(n) => document.getElementById('shade-label').textContent.includes('latent ' + n)",
        arg=chosen,
    )
    assert f"latent={chosen}" in page.url and "text=" in page.url
    head_link = page.locator("#live-head-link").get_attribute("href")
    assert re.search(r"/heads/\d+\?text=", head_link)
    shoot(page, "live")

    # Edit an explanation (with history), then find it by search.
    page.goto(f"{server.url}/saes/{SLUG}/latents/{index}")
    page.get_by_label("Add an explanation").fill("cats sitting on mats")
    page.get_by_role("button", name="Save explanation").click()
    page.wait_for_function("() => document.querySelector('.expl-text')")
    page.get_by_role("button", name="Edit").first.click()
    page.get_by_label("Edit explanation").fill("felines resting on mats")
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_function(
        "() => document.querySelector('.expl-text').textContent.includes('felines')"
    )
    page.get_by_text("History (2 versions)").click()
    assert "cats sitting on mats" in page.locator("details.history").first.inner_text()
    shoot(page, "latent-explained")

    page.goto(f"{server.url}/search")
    page.get_by_label("Words in explanations, across all SAEs").fill("felines")
    page.get_by_role("button", name="Search", exact=True).click()
    result = page.locator("ol.results a").first
    assert result.inner_text() == f"latent {index}"
    page.locator("#fire-text").fill("The cat sat on the mat")
    page.locator("#fire-sae").select_option(SLUG)
    page.get_by_role("button", name="Find latents").click()
    page.locator("#fire-results table").wait_for()
    assert page.locator("#fire-results tbody tr").count() > 0
    shoot(page, "search")
    result.click()
    page.wait_for_url(f"{server.url}/saes/{SLUG}/latents/{index}")

    # Home, the key page and a 404.
    page.goto(f"{server.url}/")
    assert "harvested" in page.locator("table.saes").inner_text()
    shoot(page, "home")
    page.goto(f"{server.url}/key")
    shoot(page, "key")
    page.goto(f"{server.url}/saes/{SLUG}/latents/99999")
    assert page.locator("h1").inner_text() == "Page not found"
    shoot(page, "404")
