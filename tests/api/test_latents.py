"""Feature pages from the active harvest: latent list, one latent, parents, head grids."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from .test_app import assert_error


def _latents(client: TestClient, slug: str, **params: Any) -> dict[str, Any]:
    r = client.get(f"/api/v1/saes/{slug}/latents", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_list_default_is_index_order(client: TestClient, seeded: Any) -> None:
    body = _latents(client, seeded.kron)
    assert body["total"] == 16 and body["harvest_status"] == "complete"
    assert [x["index"] for x in body["items"]] == list(range(16))
    first = body["items"][5]
    assert (first["head"], first["base"], first["extension"]) == (0, 1, 1)
    assert first["explanation"] == "zebra stripes on animals"
    assert 0 <= first["density"] <= 1 and first["max_activation"] > 0
    topk = _latents(client, seeded.topk)
    assert topk["total"] == 16 and topk["items"][0]["head"] is None


@pytest.mark.parametrize(
    ("sort", "key"), [("density", "density"), ("max_activation", "max_activation")]
)
def test_sorts(client: TestClient, seeded: Any, sort: str, key: str) -> None:
    desc = [x[key] for x in _latents(client, seeded.kron, sort=sort)["items"]]
    assert desc == sorted(desc, reverse=True)
    asc = [x[key] for x in _latents(client, seeded.kron, sort=sort, order="asc")["items"]]
    assert asc == sorted(asc)
    idx = [x["index"] for x in _latents(client, seeded.kron, sort="index", order="desc")["items"]]
    assert idx == list(range(15, -1, -1))


def test_filters_and_pagination(client: TestClient, seeded: Any) -> None:
    everything = _latents(client, seeded.kron, limit=500)["items"]
    mid = sorted(x["density"] for x in everything)[8]
    some = _latents(client, seeded.kron, min_density=mid)
    assert some["total"] == sum(x["density"] >= mid for x in everything)
    assert all(x["density"] >= mid for x in some["items"])
    few = _latents(client, seeded.kron, max_density=mid)
    assert all(x["density"] <= mid for x in few["items"])

    head1 = _latents(client, seeded.kron, head=1)
    assert head1["total"] == 8 and {x["head"] for x in head1["items"]} == {1}

    explained = _latents(client, seeded.kron, has_explanation=True)
    assert [x["index"] for x in explained["items"]] == [5, 6]
    unexplained = _latents(client, seeded.kron, has_explanation=False)
    assert unexplained["total"] == 14

    found = _latents(client, seeded.kron, q="zebra")
    assert [x["index"] for x in found["items"]] == [5]
    assert _latents(client, seeded.kron, q="digits")["items"][0]["index"] == 6
    assert _latents(client, seeded.kron, q="nothing-like-this")["total"] == 0
    assert _latents(client, seeded.kron, q='"unbalanced (quote* OR')["total"] >= 0  # never a 500

    page = _latents(client, seeded.kron, limit=5, offset=10)
    assert [x["index"] for x in page["items"]] == [10, 11, 12, 13, 14]
    assert page["total"] == 16 and page["limit"] == 5 and page["offset"] == 10
    assert _latents(client, seeded.kron, offset=100)["items"] == []


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"sort": "name"}, 422),
        ({"order": "up"}, 422),
        ({"min_density": 2}, 422),
        ({"min_density": "nan"}, 422),
        ({"head": -1}, 422),
        ({"head": 2}, 404),
        ({"limit": 501}, 422),
        ({"has_explanation": "maybe"}, 422),
    ],
)
def test_list_bad_params(
    client: TestClient, seeded: Any, params: dict[str, Any], status: int
) -> None:
    assert_error(client.get(f"/api/v1/saes/{seeded.kron}/latents", params=params), status)


def test_head_filter_on_non_kronsae(client: TestClient, seeded: Any) -> None:
    assert_error(client.get(f"/api/v1/saes/{seeded.topk}/latents", params={"head": 0}), 422)


def test_unharvested_sae(client: TestClient, seeded: Any) -> None:
    body = _latents(client, seeded.unharvested)
    assert body == {"items": [], "total": 0, "limit": 50, "offset": 0, "harvest_status": "none"}
    r = client.get(f"/api/v1/saes/{seeded.unharvested}/latents/3")
    assert r.status_code == 200
    detail = r.json()
    assert detail["harvest_status"] == "none" and detail["harvest_id"] is None
    assert detail["stats"] is None and detail["histogram"] is None
    assert detail["top_examples"] == [] and detail["sampled_examples"] == []
    assert [e["text"] for e in detail["explanations"]] == ["an explained latent, no harvest"]
    comp = detail["composition"]
    assert (comp["head"], comp["base"], comp["extension"]) == (0, 0, 3)
    assert comp["base_parent"]["stats"] is None
    assert len(comp["row_siblings"]) == 3 and comp["row_siblings"][0]["density"] is None
    grid = client.get(f"/api/v1/saes/{seeded.unharvested}/heads/0").json()
    assert grid["harvest_status"] == "none" and grid["cells"][0][0]["density"] is None


def test_latent_detail(client: TestClient, seeded: Any) -> None:
    r = client.get(f"/api/v1/saes/{seeded.kron}/latents/5")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["sae"] == seeded.kron and d["index"] == 5 and d["architecture"] == "kronsae"
    assert d["harvest_status"] == "complete" and d["harvest_id"]
    assert d["stats"]["max_activation"] > 0 and 0 <= d["stats"]["density"] <= 1
    hist = d["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    assert [e["text"] for e in d["explanations"]] == ["zebra stripes on animals"]

    comp = d["composition"]
    assert (comp["head"], comp["base"], comp["extension"]) == (0, 1, 1)
    assert comp["base_parent"]["kind"] == "base" and comp["base_parent"]["flat_index"] == 1
    assert (
        comp["extension_parent"]["flat_index"] == 1
        and comp["extension_parent"]["stats"] is not None
    )
    # row siblings share the base (g=0, i=1): latents 4, 6, 7; column siblings share j=1: latent 1
    assert [s["index"] for s in comp["row_siblings"]] == [4, 6, 7]
    assert [s["index"] for s in comp["column_siblings"]] == [1]
    assert comp["row_siblings"][1]["explanation"] == "numbers and digits"
    assert all(s["density"] is not None for s in comp["row_siblings"])

    top = d["top_examples"]
    assert len(top) == 3 and [e["rank"] for e in top] == [0, 1, 2]
    assert all(len(e["tokens"]) == len(e["values"]) == 8 for e in top)
    assert top[0]["tokens"][0].startswith("tok")
    assert top[0]["max_value"] >= top[1]["max_value"] >= top[2]["max_value"]

    groups = d["sampled_examples"]
    assert d["interval_mode"] == "width" and len(groups) == 5
    assert groups[0]["low"] == 0 and all(g["low"] <= g["high"] for g in groups)
    assert sum(len(g["examples"]) for g in groups) == 2
    for g in groups:
        for e in g["examples"]:
            assert g["low"] <= e["sample_value"] <= g["high"] + 1e-6

    assert d["logit_effects"] == {
        "top": [{"token": "cat", "value": 1.5}],
        "bottom": [{"token": "dog", "value": -0.5}],
    }
    assert [(n["index"], n["cosine"]) for n in d["neighbours"]] == [(6, 0.9), (1, 0.5)]
    assert d["neighbours"][0]["explanation"] == "numbers and digits"


def test_latent_detail_options(client: TestClient, seeded: Any) -> None:
    url = f"/api/v1/saes/{seeded.kron}/latents/5"
    q = client.get(
        url, params={"intervals": 2, "mode": "quantile", "top_k": 1, "per_interval": 1}
    ).json()
    assert q["interval_mode"] == "quantile" and len(q["sampled_examples"]) == 2
    assert len(q["top_examples"]) == 1
    assert all(len(g["examples"]) <= 1 for g in q["sampled_examples"])
    none = client.get(url, params={"intervals": 0, "top_k": 0}).json()
    assert none["sampled_examples"] == [] and none["top_examples"] == []
    assert_error(client.get(url, params={"mode": "log"}), 422)
    assert_error(client.get(url, params={"intervals": 21}), 422)


def test_non_kronsae_detail_has_null_composition(client: TestClient, seeded: Any) -> None:
    d = client.get(f"/api/v1/saes/{seeded.topk}/latents/0").json()
    assert d["composition"] is None and d["architecture"] == "topk"
    assert d["top_examples"]
    assert_error(client.get(f"/api/v1/saes/{seeded.topk}/heads/0"), 404)
    assert_error(client.get(f"/api/v1/saes/{seeded.topk}/parents/base/0/0"), 404)


@pytest.mark.parametrize("index", ["16", "-1", "99999999999999999999999", "abc"])
def test_latent_out_of_range(client: TestClient, seeded: Any, index: str) -> None:
    r = client.get(f"/api/v1/saes/{seeded.kron}/latents/{index}")
    if index == "abc":
        assert_error(r, 422)
    else:
        err = assert_error(r, 404, "not_found")
        assert "out of range" in err["message"] and "0 to 15" in err["message"]
    assert_error(client.get("/api/v1/saes/missing/latents/0"), 404)


def test_parent_pages(client: TestClient, seeded: Any) -> None:
    base = client.get(f"/api/v1/saes/{seeded.kron}/parents/base/1/0")
    assert base.status_code == 200, base.text
    b = base.json()
    assert (b["kind"], b["head"], b["index"], b["flat_index"]) == ("base", 1, 0, 2)
    assert [c["index"] for c in b["children"]] == [8, 9, 10, 11]
    assert [e["text"] for e in b["explanations"]] == ["animal words"]
    assert b["stats"] is not None and b["top_examples"]

    ext = client.get(f"/api/v1/saes/{seeded.kron}/parents/extension/1/1").json()
    assert ext["flat_index"] == 5 and [c["index"] for c in ext["children"]] == [9, 13]
    assert [e["text"] for e in ext["explanations"]] == ["plural endings"]

    for path, status in [
        ("base/2/0", 404),
        ("base/0/2", 404),
        ("extension/0/4", 404),
        ("extension/-1/0", 404),
        ("middle/0/0", 422),
        ("base/x/0", 422),
    ]:
        assert_error(client.get(f"/api/v1/saes/{seeded.kron}/parents/{path}"), status)


def test_head_grid(client: TestClient, seeded: Any) -> None:
    r = client.get(f"/api/v1/saes/{seeded.kron}/heads/1")
    assert r.status_code == 200, r.text
    g = r.json()
    assert (g["head"], g["m"], g["n"]) == (1, 2, 4)
    assert len(g["cells"]) == 2 and all(len(row) == 4 for row in g["cells"])
    assert [[c["index"] for c in row] for row in g["cells"]] == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert all(c["density"] is not None for row in g["cells"] for c in row)
    assert [r["label"] for r in g["rows"]] == ["animal words", None]
    assert [c["label"] for c in g["columns"]] == [None, "plural endings", None, None]
    assert g["rows"][0]["flat_index"] == 2 and g["columns"][1]["flat_index"] == 5
    head0 = client.get(f"/api/v1/saes/{seeded.kron}/heads/0").json()
    assert head0["cells"][1][1]["explanation"] == "zebra stripes on animals"
    assert_error(client.get(f"/api/v1/saes/{seeded.kron}/heads/2"), 404)
    assert_error(client.get(f"/api/v1/saes/{seeded.kron}/heads/-5"), 404)


def test_pages_match_their_documented_models(client: TestClient, seeded: Any) -> None:
    """The feature pages are serialised directly (not through their response models): each
    must still be exactly what its model in the OpenAPI schema says."""
    from kronscope.api import schemas

    for path, model in [
        (f"/api/v1/saes/{seeded.kron}/latents?sort=density&limit=7&offset=3", schemas.LatentPage),
        (f"/api/v1/saes/{seeded.kron}/latents?q=zebra", schemas.LatentPage),
        (f"/api/v1/saes/{seeded.kron}/latents/5", schemas.LatentDetail),
        (f"/api/v1/saes/{seeded.kron}/latents/5?mode=quantile&intervals=3", schemas.LatentDetail),
        (f"/api/v1/saes/{seeded.topk}/latents/0", schemas.LatentDetail),
        (f"/api/v1/saes/{seeded.unharvested}/latents/3", schemas.LatentDetail),
        (f"/api/v1/saes/{seeded.kron}/parents/base/1/0", schemas.ParentDetail),
        (f"/api/v1/saes/{seeded.kron}/heads/1", schemas.HeadGrid),
    ]:
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", path
        body = r.json()
        parsed = model.model_validate_json(r.content)
        # Nothing the model does not know, nothing missing, values as the model writes them.
        assert parsed.model_dump(mode="json") == body, path
    expl = client.get(f"/api/v1/saes/{seeded.kron}/latents/5").json()["explanations"][0]
    assert expl["created_at"].endswith("Z") and "+" not in expl["created_at"]


def test_pages_follow_a_new_harvest_and_a_delete(
    client: TestClient, seeded: Any, db_factory: Any, make_sae: Any
) -> None:
    """A page plans its reads from the SAE row an earlier page read; when the row changed
    meanwhile (a new harvest became active, the SAE was deleted) the page is read again."""
    from helpers.db import write_fake_harvest
    from kronscope.db.repositories import saes

    with db_factory() as s:
        sae = make_sae(s, d_sae=32)
        slug = sae.slug
        first = write_fake_harvest(s, sae, seed=1)
        s.commit()
    page = client.get(f"/api/v1/saes/{slug}/latents/3").json()
    listing = client.get(f"/api/v1/saes/{slug}/latents", params={"sort": "density"}).json()
    assert page["harvest_id"] == first
    with db_factory() as s:
        sae = saes.get_sae_by_slug(s, slug)
        assert sae is not None
        second = write_fake_harvest(s, sae, seed=2, ctx_len=6)
        s.commit()
    page = client.get(f"/api/v1/saes/{slug}/latents/3").json()
    assert page["harvest_id"] == second and len(page["top_examples"][0]["tokens"]) == 6
    again = client.get(f"/api/v1/saes/{slug}/latents", params={"sort": "density"}).json()
    assert again["items"] != listing["items"]  # the new harvest's densities
    with db_factory() as s:
        sae = saes.get_sae_by_slug(s, slug)
        assert sae is not None
        saes.delete_sae(s, sae)
        s.commit()
    for path in ("latents/3", "latents", "heads/0", "parents/base/0/0"):
        assert_error(client.get(f"/api/v1/saes/{slug}/{path}"), 404)
