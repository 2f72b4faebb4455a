"""Pages as a person sees them: the real app over the seeded database (SQLite and
PostgreSQL), each page parsed and checked for the text and links it shows."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from kronscope.web.templating import visible_token

from .conftest import HOSTILE, HOSTILE_TOKENS, World, read_page, sign_in


# -- home and the SAE page ---------------------------------------------------------------------------
def test_home_lists_saes_with_their_facts(client: TestClient, world: World) -> None:
    page = read_page(client, "/")
    assert page.status == 200
    rows = {
        row.find("th").get_text(" ", strip=True): " ".join(row.get_text(" ").split())
        for row in page.soup.select("table.saes tbody tr")
    }
    kron = rows[world.kron]
    for fact in (
        "tiny-gpt2",
        "transformer.h.1",
        "kronsae",
        "h=2, m=2, n=4",
        "16 latents",
        "fvu",
        "0.25",
        "harvested",
        "128 tokens",
    ):
        assert fact in kron, fact
    assert "topk" in rows[world.topk]
    assert "harvesting" in rows[world.busy]  # still running: says so
    assert page.links()[world.kron] == f"/saes/{world.kron}"


def test_sae_page_browses_latents(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.kron}")
    assert page.status == 200
    assert "Showing 1–16 of 16 latents" in page.text
    rows = page.soup.select("table.latents tbody tr")
    assert [r.find("a").get_text() for r in rows] == [str(i) for i in range(16)]
    explained = next(r for r in rows if r.find("a").get_text() == "5")
    assert world.explanation in explained.get_text()
    assert f"/saes/{world.kron}/parents/base/0/1" in {a["href"] for a in explained.find_all("a")}


def _indices(page) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(r.find("a").get_text()) for r in page.soup.select("table.latents tbody tr")]


def _densities(page) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for row in page.soup.select("table.latents tbody tr"):
        text = row.select("td.num")[0].get_text().strip().rstrip("%")
        out.append(float(text))
    return out


def test_sae_page_sorts_filters_and_searches(client: TestClient, world: World) -> None:
    by_density = read_page(client, f"/saes/{world.kron}?sort=density")
    densities = _densities(by_density)
    assert densities == sorted(densities, reverse=True)

    ascending = read_page(client, f"/saes/{world.kron}?sort=max_activation&order=asc")
    assert _indices(ascending)[0] == world.no_examples  # max 0

    ranged = read_page(client, f"/saes/{world.kron}?min_density=0.05&max_density=0.09")
    assert all(5.0 <= d <= 9.0 for d in _densities(ranged)) and _densities(ranged)
    as_percent = read_page(client, f"/saes/{world.kron}?min_density=5%25&max_density=9%25")
    assert _indices(as_percent) == _indices(ranged)

    head = read_page(client, f"/saes/{world.kron}?head=1")
    assert _indices(head) == list(range(8, 16))

    search = read_page(client, f"/saes/{world.kron}?q=zebra")
    assert _indices(search) == [world.explained]
    explained = read_page(client, f"/saes/{world.kron}?explained=yes")
    assert {5, 6} <= set(_indices(explained))  # other tests may explain more
    cells = [td.get_text(strip=True) for td in explained.soup.select("td.expl-cell")]
    assert all(c and c != "—" for c in cells)
    unexplained = read_page(client, f"/saes/{world.kron}?explained=no")
    assert not {5, 6} & set(_indices(unexplained))
    nothing = read_page(client, f"/saes/{world.kron}?q=unicorn")
    assert "No latents match these filters." in nothing.text


def test_sae_page_names_bad_filters_in_plain_words(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.kron}?min_density=lots&head=9&sort=nonsense")
    assert page.status == 200
    alert = page.soup.find(attrs={"role": "alert"}).get_text(" ")
    assert "Minimum density must be a fraction between 0 and 1" in alert
    assert "'lots'" in alert
    assert "Head must be a whole number from 0 to 1" in alert
    assert "Sort must be one of" in alert
    assert len(_indices(page)) == 16  # the bad filters were ignored


def test_go_to_latent_form_opens_the_latent(client: TestClient, world: World) -> None:
    jump = client.get(f"/saes/{world.kron}/latents?index=12", follow_redirects=False)
    assert jump.status_code == 303
    assert jump.headers["location"] == f"/saes/{world.kron}/latents/12"
    assert read_page(client, f"/saes/{world.kron}/latents?index=x").status == 404


def test_sae_still_harvesting_shows_status_and_progress(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.busy}")
    assert page.status == 200
    assert "harvesting" in page.text
    assert "no completed harvest yet (status: running)" in page.text
    progress = page.soup.find("progress")
    assert progress is not None and float(progress["value"]) == pytest.approx(0.25)
    assert any(h.startswith("/jobs/") for h in page.hrefs())


# -- the latent page ------------------------------------------------------------------------------------
def test_latent_page_shows_explanation_with_history_and_stats(
    client: TestClient, world: World
) -> None:
    page = read_page(client, f"/saes/{world.kron}/latents/{world.explained}")
    assert page.status == 200
    assert page.soup.find("h1").get_text(" ", strip=True).startswith("Latent 5")
    explanation = page.soup.select_one("#explanations .expl-text").get_text()
    assert explanation == world.explanation
    history = page.soup.select_one("#explanations details.history")
    assert "History (2 versions)" in history.get_text()
    assert world.edited_from in history.get_text() and "tester" in history.get_text()
    facts = page.soup.select_one("dl.facts").get_text(" ")
    assert "Density" in facts and "%" in facts
    hist = page.soup.select_one("svg.svg-chart")
    labels = [t.get_text() for t in hist.find_all("text")]
    assert "activation value" in labels and "tokens" in labels
    assert len(hist.find_all("rect")) == 3  # one bar per bin
    assert "fraction of tokens where active (log scale)" in page.text


def test_latent_page_shows_top_examples_escaped_and_visible(
    client: TestClient, world: World
) -> None:
    page = read_page(client, f"/saes/{world.kron}/latents/{world.explained}")
    first = page.soup.select_one("#top-h").find_parent("section").select_one("li.example")
    shown = [span.get_text() for span in first.select("span.tok")]
    assert shown == [visible_token(t) for t in HOSTILE_TOKENS]
    assert shown[1:5] == ["·the", "↵", "⇥", "\\x07"]
    marked = first.select("span.tok.max")
    assert [m.get_text() for m in marked] == [HOSTILE]  # the maximum, marked, and escaped
    assert "(maximum)" in marked[0]["title"] and "=" in marked[0]["title"]
    # Nothing of the hostile text became markup.
    main = page.soup.find("main")
    assert main.find("img") is None and main.find("script") is None
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.html
    assert "<img src=x" not in page.html
    assert "&amp;amp;" in page.html  # a token "&amp;" is shown as typed
    assert re.search(r"default-src 'self'", page.headers["content-security-policy"])


def test_latent_page_shows_sampled_examples_by_interval(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.kron}/latents/{world.explained}")
    groups = page.soup.select("details.interval")
    assert len(groups) == 5
    assert sum(len(g.select("li.example")) for g in groups) == 2
    assert all(" to " in g.find("summary").get_text() for g in groups)


def test_composition_panel_links_parents_and_siblings(client: TestClient, world: World) -> None:
    # Latent 13 = head 1, base 1, extension 1; latent 9 = head 1, base 0, extension 1.
    page = read_page(client, f"/saes/{world.kron}/latents/9")
    panel = page.soup.select_one("section.composition")
    text = " ".join(panel.get_text(" ").split())
    hrefs = {a["href"] for a in panel.find_all("a")}
    assert f"/saes/{world.kron}/parents/base/1/0" in hrefs
    assert f"/saes/{world.kron}/parents/extension/1/1" in hrefs
    assert world.base_explanation in text and world.extension_explanation in text
    assert "Top tokens:" in text
    row = {f"/saes/{world.kron}/latents/{i}" for i in (8, 10, 11)}
    column = {f"/saes/{world.kron}/latents/13"}
    assert row | column <= hrefs
    assert "Row siblings: same base parent 0 (3)" in text
    assert "Column siblings: same extension parent 1 (1)" in text


def test_composition_panel_shows_the_and_numbers(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.kron}/latents/{world.explained}")
    numbers = " ".join(page.soup.select_one(".and-numbers").get_text(" ").split())
    assert "Both parents fired 40 tokens" in numbers
    assert "Latent kept by TopK 30 tokens" in numbers
    assert "Kept / both fired 75.0%" in numbers
    row_siblings = page.soup.select(".siblings table")[0].get_text(" ")
    assert world.sibling_explanation in row_siblings  # latent 6 shares the base parent


def test_latent_page_shows_logit_effects_and_neighbours(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.kron}/latents/{world.explained}")
    logits = page.soup.select_one("#logit-h").find_parent("section").get_text(" ")
    assert "cat" in logits and "+1.5" in logits and "dog" in logits and "-0.5" in logits
    neighbours = page.soup.select_one("#nb-h").find_parent("section")
    assert [a.get_text() for a in neighbours.select("tbody a")] == ["6", "1"]
    assert "0.9" in neighbours.get_text()


def test_latent_without_examples_says_so(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.kron}/latents/{world.no_examples}")
    assert page.status == 200
    assert "No examples: this latent never fired in the harvested corpus." in page.text
    assert "No activation histogram" in page.text


def test_latent_of_unharvested_sae_says_so(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.busy}/latents/3")
    assert page.status == 200
    assert "no completed harvest yet" in page.text
    assert "No examples yet: this SAE has no completed harvest (status: running)." in page.text


def test_topk_latent_has_no_composition(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.topk}/latents/3")
    assert page.status == 200
    assert page.soup.select_one("section.composition") is None
    assert f"{HOSTILE} in an explanation" == page.soup.select_one(".expl-text").get_text()
    assert page.soup.find("main").find("img") is None


# -- parents, heads and tools -------------------------------------------------------------------------------
def test_parent_page_shows_explanation_children_and_examples(
    client: TestClient, world: World
) -> None:
    page = read_page(client, f"/saes/{world.kron}/parents/base/1/0")
    assert page.status == 200
    assert page.soup.find("h1").get_text(" ", strip=True).startswith("Base parent 0")
    assert page.soup.select_one(".expl-text").get_text() == world.base_explanation
    children = page.soup.select_one("#children-h").find_parent("section")
    assert [a.get_text() for a in children.select("tbody tr td:first-child a")] == [
        "8",
        "9",
        "10",
        "11",
    ]
    assert page.soup.select("li.example")  # its own top examples
    extension = read_page(client, f"/saes/{world.kron}/parents/extension/1/1")
    kids = extension.soup.select_one("#children-h").find_parent("section")
    assert [a.get_text() for a in kids.select("tbody tr td:first-child a")] == ["9", "13"]


def test_head_page_is_a_grid_of_links_with_parent_labels(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.kron}/heads/1")
    assert page.status == 200
    cells = page.soup.select("#heatmap a.cell")
    assert [c["href"] for c in cells] == [f"/saes/{world.kron}/latents/{i}" for i in range(8, 16)]
    rows = [th.get_text(" ", strip=True) for th in page.soup.select("#heatmap th.row-label")]
    assert rows[0] == f"i=0 {world.base_explanation}" and rows[1] == "i=1"
    cols = [th.get_text(" ", strip=True) for th in page.soup.select("#heatmap th.col-label")]
    assert cols[1] == f"j=1 {world.extension_explanation}"
    assert all(re.fullmatch(r"cell s\d+", " ".join(c["class"])) for c in cells)
    form = page.soup.find("form", id="head-text-form")
    assert form["data-first"] == "8" and form["data-m"] == "2" and form["data-n"] == "4"


def test_head_page_keeps_a_linked_text_escaped(client: TestClient, world: World) -> None:
    page = read_page(
        client, f"/saes/{world.kron}/heads/0?text=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E"
    )
    assert page.soup.find("textarea", id="head-text").get_text() == HOSTILE
    assert page.soup.find("main").find("img") is None
    jump = client.get(f"/saes/{world.kron}/heads/0?goto=1", follow_redirects=False)
    assert jump.headers["location"] == f"/saes/{world.kron}/heads/1"


def test_live_page_prefills_from_a_deep_link(client: TestClient, world: World) -> None:
    page = read_page(client, f"/saes/{world.kron}/live?text=%3Cscript%3Ex%3C/script%3E&latent=5")
    assert page.status == 200
    assert page.soup.find("textarea", id="live-text").get_text() == "<script>x</script>"
    assert page.soup.find("input", id="live-latent")["value"] == "5"
    assert page.soup.find("main").find("script") is None
    form = page.soup.find("form", id="live-form")
    assert form["data-sae"] == world.kron and form["data-kron"] == "true"


def test_search_page_finds_explanations_across_saes(client: TestClient, world: World) -> None:
    page = read_page(client, "/search?q=zebra")
    results = page.soup.select("ol.results li")
    assert len(results) == 1
    assert results[0].find("a")["href"] == f"/saes/{world.kron}/latents/5"
    assert [m.get_text() for m in results[0].find_all("mark")] == ["zebra"]
    parents = read_page(client, "/search?q=plural")
    assert (
        parents.soup.select_one("ol.results a")["href"]
        == f"/saes/{world.kron}/parents/extension/1/1"
    )
    hostile = read_page(client, "/search?q=onerror")
    assert hostile.soup.find("main").find("img") is None
    assert HOSTILE in hostile.soup.select_one("ol.results .snippet").get_text()
    none = read_page(client, "/search?q=unicorn")
    assert "No explanation matches “unicorn”." in none.text
    options = [o["value"] for o in page.soup.select("#fire-sae option")]
    assert world.kron in options and world.topk in options


def test_upload_page_asks_for_a_key_first(client: TestClient, web_keys) -> None:  # type: ignore[no-untyped-def]
    page = read_page(client, "/upload")
    assert "Uploading needs an API key with the upload scope." in page.text
    assert page.soup.select_one("#upload-form button[type=submit]").has_attr("disabled")
    folder = page.soup.find("input", id="upload-folder")
    assert folder.has_attr("webkitdirectory") and folder.has_attr("multiple")
    sign_in(client, web_keys.all)
    ready = read_page(client, "/upload")
    assert not ready.soup.select_one("#upload-form button[type=submit]").has_attr("disabled")
    assert "builtin" in [
        o["value"] for o in ready.soup.select("select[name=harvest_corpus] option")
    ]


def test_job_page_shows_progress(client: TestClient, world: World) -> None:
    sae_page = read_page(client, f"/saes/{world.busy}")
    job_href = next(h for h in sae_page.hrefs() if h.startswith("/jobs/"))
    page = read_page(client, job_href)
    assert page.status == 200
    assert "250 of 1,000 tokens" in page.text
    assert page.soup.find("div", id="job")["data-status"] == "running"


# -- not found -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/no/such/page", "There is nothing at /no/such/page."),
        ("/saes/no-such-sae", "There is no SAE named 'no-such-sae'."),
        ("/saes/{kron}/latents/16", "Latent 16 is out of range"),
        ("/saes/{kron}/latents/abc", "There is no latent 'abc'"),
        ("/saes/{kron}/parents/middle/0/0", "There is no parent kind 'middle'"),
        ("/saes/{kron}/parents/base/0/2", "Base parent 2 is out of range"),
        ("/saes/{kron}/heads/2", "Head 2 is out of range"),
        ("/saes/{topk}/heads/0", "only KronSAEs have parents and heads"),
        ("/jobs/no-such-job", "There is no job 'no-such-job'."),
        ("/static/nope.css", "There is nothing at /static/nope.css."),
    ],
)
def test_unknown_pages_get_the_404_page(
    client: TestClient, world: World, path: str, message: str
) -> None:
    page = read_page(client, path.format(kron=world.kron, topk=world.topk))
    assert page.status == 404
    assert page.soup.find("h1").get_text() == "Page not found"
    assert message in page.text
    assert page.links()["All SAEs"] == "/"


def test_api_errors_stay_json(client: TestClient) -> None:
    response = client.get("/api/v1/saes/no-such-sae")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_static_files_are_served(client: TestClient) -> None:
    css = client.get("/static/css/app.css")
    assert css.status_code == 200 and ".tok" in css.text
    js = client.get("/static/js/tokens.js")
    assert js.status_code == 200 and "visibleToken" in js.text
