"""The latent browser at 65,536 latents: server-side, index-backed pages stay fast at any
offset, sort and filter (SQLite and PostgreSQL)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker

from kronscope.db import make_engine
from kronscope.db.models import UnitKind
from kronscope.db.repositories import explanations, harvests, saes, stats

from .conftest import World, read_page

F = 65_536
PAGE_BUDGET_S = 2.0
"""Generous for a shared CI machine; locally each page takes well under 0.2 s."""


@pytest.fixture(scope="module")
def big_sae(web_db: tuple[str, World]) -> Iterator[str]:
    engine = make_engine(web_db[0])
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    slug = f"web-big-{secrets.token_hex(3)}"
    rng = np.random.default_rng(0)
    frequency = rng.random(F) ** 4  # many rare latents, a few dense ones
    with factory() as s:
        sae = saes.create_sae(
            s, slug=slug, architecture="kronsae", d_in=64, d_sae=F, k=32, h=F // 8, m=2, n=4,
            composition="mand", file_hash=secrets.token_hex(32), storage_path=f"saes/{slug}",
            model_name="tiny-gpt2", hook_name="transformer.h.1",
        )  # fmt: skip
        s.flush()
        harvest = harvests.create_harvest(s, sae.id, corpus_name="big", n_tokens=10**6, ctx_len=64)
        harvests.mark_running(s, harvest.id)
        stats.add_stats(
            s,
            harvest.id,
            (
                {
                    "unit_kind": int(UnitKind.LATENT),
                    "unit_index": i,
                    "n_active": int(frequency[i] * 10**6),
                    "frequency": float(frequency[i]),
                    "mean_value": 1.0,
                    "max_value": float(i % 997) / 10,
                }
                for i in range(F)
            ),
        )
        explanations.create_explanation(s, sae.id, UnitKind.LATENT, F - 1, "the very last latent")
        harvests.mark_complete(s, harvest.id, tokens_seen=10**6)
        s.commit()
    engine.dispose()
    yield slug


def _timed(client: TestClient, path: str):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    page = read_page(client, path)
    return page, time.perf_counter() - start


def _indices(page) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(r.find("a").get_text()) for r in page.soup.select("table.latents tbody tr")]


def test_browsing_65k_latents_is_fast_at_any_page(client: TestClient, big_sae: str) -> None:
    read_page(client, f"/saes/{big_sae}")  # warm up
    last, took = _timed(client, f"/saes/{big_sae}?p=1311")
    assert took < PAGE_BUDGET_S, took
    assert _indices(last) == list(range(65_500, F))
    assert "Showing 65,501–65,536 of 65,536 latents" in last.text
    assert "Page 1,311 of 1,311" in last.text

    deep, took = _timed(client, f"/saes/{big_sae}?sort=density&p=1000")
    assert took < PAGE_BUDGET_S, took
    dens = [
        float(r.select("td.num")[0].get_text().strip().rstrip("%"))
        for r in deep.soup.select("table.latents tbody tr")
    ]
    assert len(dens) == 50 and dens == sorted(dens, reverse=True)
    pager = {a.get_text(strip=True): a["href"] for a in deep.soup.select("nav.pager a")}
    assert pager["Next ›"] == "?sort=density&p=1001"  # links keep the view's filters
    assert pager["‹ Previous"] == "?sort=density&p=999"

    ranged, took = _timed(
        client, f"/saes/{big_sae}?sort=max_activation&min_density=0.5&max_density=0.6&p=20"
    )
    assert took < PAGE_BUDGET_S, took
    assert len(_indices(ranged)) == 50

    head, took = _timed(client, f"/saes/{big_sae}?head=8191")
    assert took < PAGE_BUDGET_S, took
    assert _indices(head) == list(range(F - 8, F))

    found, took = _timed(client, f"/saes/{big_sae}?q=very+last")
    assert took < PAGE_BUDGET_S, took
    assert _indices(found) == [F - 1]

    grid, took = _timed(client, f"/saes/{big_sae}/heads/8191")
    assert took < PAGE_BUDGET_S, took
    assert len(grid.soup.select("#heatmap a.cell")) == 8

    latent, took = _timed(client, f"/saes/{big_sae}/latents/{F - 1}")
    assert took < PAGE_BUDGET_S, took
    assert latent.soup.select_one(".expl-text").get_text() == "the very last latent"
