"""Explanations through the real app: create / edit (history) / soft delete, parents, search
(ranking, highlights, hostile queries) and generation jobs with both backends, the LLM one
against a fake OpenAI-compatible server (success, timeout, HTTP 500, garbage), with
nothing half-written on failure."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from kronscope.db.models import Explanation, ExplanationRevision

from .conftest import Api
from .fake_openai import FakeOpenAI

LATENT = "/api/v1/saes/{}/latents/{}/explanations"
PARENT = "/api/v1/saes/{}/parents/{}/{}/{}/explanations"
SEARCH = "/api/v1/explanations/search"


def n_explanations(api: Api) -> tuple[int, int]:
    with api.sessions() as s:
        return (
            s.scalar(sa.select(sa.func.count()).select_from(Explanation)) or 0,
            s.scalar(sa.select(sa.func.count()).select_from(ExplanationRevision)) or 0,
        )


def unit(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item["unit"].items() if v is not None}


def write(api: Api, slug: str, index: int, text: str) -> dict[str, Any]:
    r = api.client.post(LATENT.format(slug, index), json={"text": text}, headers=api.headers)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


# -- writing -----------------------------------------------------------------------------------
def test_create_edit_history_and_soft_delete(api: Api) -> None:
    created = write(api, "tiny-kron", 17, "  fires on quick brown animals  ")
    assert created["text"] == "fires on quick brown animals"
    assert created["source"] == "human" and created["author"] == "alice"
    assert unit(created) == {"kind": "latent", "index": 17, "head": 2, "base": 0, "extension": 1}
    assert [h["text"] for h in created["history"]] == ["fires on quick brown animals"]
    eid = created["id"]

    bob = api.new_key("bob", ["explanations"])
    r = api.client.put(
        LATENT.format("tiny-kron", 17) + f"/{eid}",
        json={"text": "fires on foxes"},
        headers={"X-API-Key": bob},
    )
    assert r.status_code == 200, r.text
    edited = r.json()
    assert edited["text"] == "fires on foxes" and edited["author"] == "bob"
    assert [(h["text"], h["author"]) for h in edited["history"]] == [
        ("fires on quick brown animals", "alice"),
        ("fires on foxes", "bob"),
    ]
    listed = api.client.get(LATENT.format("tiny-kron", 17)).json()
    assert listed["total"] == 1 and listed["items"][0]["history"] == edited["history"]

    assert (
        api.client.delete(
            LATENT.format("tiny-kron", 17) + f"/{eid}", headers=api.headers
        ).status_code
        == 204
    )
    assert api.client.get(LATENT.format("tiny-kron", 17)).json()["total"] == 0
    with_deleted = api.client.get(
        LATENT.format("tiny-kron", 17), params={"include_deleted": True}
    ).json()
    assert with_deleted["total"] == 1 and with_deleted["items"][0]["deleted"] is True
    assert len(with_deleted["items"][0]["history"]) == 2  # kept
    one = api.client.get(LATENT.format("tiny-kron", 17) + f"/{eid}").json()
    assert one["deleted"] is True
    # a deleted explanation cannot be edited or deleted again
    r = api.client.put(
        LATENT.format("tiny-kron", 17) + f"/{eid}", json={"text": "x"}, headers=api.headers
    )
    assert r.status_code == 404
    assert (
        api.client.delete(
            LATENT.format("tiny-kron", 17) + f"/{eid}", headers=api.headers
        ).status_code
        == 404
    )
    # not shown on the latent's page, not found by search
    page = api.client.get("/api/v1/saes/tiny-kron/latents/17").json()
    assert page["explanations"] == []
    assert api.client.get(SEARCH, params={"q": "foxes"}).json()["total"] == 0


def test_explanation_belongs_to_its_unit_and_keys_are_checked(api: Api) -> None:
    eid = write(api, "tiny-kron", 3, "three")["id"]
    assert (
        api.client.put(
            LATENT.format("tiny-kron", 4) + f"/{eid}", json={"text": "x"}, headers=api.headers
        ).status_code
        == 404
    )
    assert api.client.get(LATENT.format("tiny-topk", 3) + f"/{eid}").status_code == 404
    assert (
        api.client.post(
            LATENT.format("tiny-kron", 64), json={"text": "x"}, headers=api.headers
        ).status_code
        == 404
    )
    assert (
        api.client.post(
            LATENT.format("nope", 1), json={"text": "x"}, headers=api.headers
        ).status_code
        == 404
    )
    r = api.client.post(LATENT.format("tiny-kron", 3), json={"text": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    uploader = api.new_key("carol", ["upload"])
    r = api.client.post(
        LATENT.format("tiny-kron", 3), json={"text": "x"}, headers={"X-API-Key": uploader}
    )
    assert r.status_code == 403 and "explanations" in r.json()["error"]["message"]


def test_text_validation(api: Api) -> None:
    url = LATENT.format("tiny-kron", 5)
    for text, status in (("", 422), ("   ", 422), ("a\x00b", 422), ("x" * 2001, 422)):
        r = api.client.post(url, json={"text": text}, headers=api.headers)
        assert r.status_code == status, (text[:10], r.text)
        assert r.json()["error"]["message"]
    r = api.client.post(url, json={"text": "any script: 世界 مرحبا 🦊 <b>"}, headers=api.headers)
    assert r.status_code == 201 and r.json()["text"] == "any script: 世界 مرحبا 🦊 <b>"
    # a lone surrogate (valid JSON, not storable): refused in plain words or replaced
    for raw in (b'{"text": "odd \\udc80 surrogate"}', b'{"text": "odd \\ud800 surrogate"}'):
        r = api.client.post(
            url, content=raw, headers={**api.headers, "Content-Type": "application/json"}
        )
        assert r.status_code in (201, 422), r.text
        if r.status_code == 201:
            assert r.json()["text"] == "odd \ufffd surrogate"
        else:
            assert "text" in r.json()["error"]["message"]


def test_parent_explanations(api: Api) -> None:
    r = api.client.post(
        PARENT.format("tiny-kron", "base", 2, 1), json={"text": "base meaning"}, headers=api.headers
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert unit(body) == {"kind": "base", "index": 5, "head": 2, "index_in_head": 1}
    eid = body["id"]
    r = api.client.put(
        PARENT.format("tiny-kron", "base", 2, 1) + f"/{eid}",
        json={"text": "base, refined"},
        headers=api.headers,
    )
    assert r.status_code == 200 and len(r.json()["history"]) == 2
    assert api.client.get(PARENT.format("tiny-kron", "base", 2, 1)).json()["total"] == 1
    assert api.client.get(PARENT.format("tiny-kron", "extension", 2, 1)).json()["total"] == 0
    for args in (
        ("tiny-kron", "base", 8, 0),
        ("tiny-kron", "base", 0, 2),
        ("tiny-kron", "extension", 0, 4),
        ("tiny-topk", "base", 0, 0),
    ):
        r = api.client.post(PARENT.format(*args), json={"text": "x"}, headers=api.headers)
        assert r.status_code == 404, args
    assert (
        api.client.post(
            PARENT.format("tiny-kron", "middle", 0, 0), json={"text": "x"}, headers=api.headers
        ).status_code
        == 422
    )


# -- search --------------------------------------------------------------------------------------
def test_search_ranking_highlights_and_pages(api: Api) -> None:
    write(api, "tiny-kron", 1, "fires on the word composition in mathematics")
    write(api, "tiny-kron", 2, "composition composition: function composition and mAND composition")
    write(api, "tiny-topk", 3, "an unrelated feature about cats")
    write(api, "tiny-topk", 4, "<script>alert(1)</script> composition in HTML")
    r = api.client.get(SEARCH, params={"q": "composition"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 3 and body["query"] == "composition"
    first = body["items"][0]
    assert (first["sae"], first["unit"]["index"]) == ("tiny-kron", 2)  # most matches ranks first
    ranks = [i["rank"] for i in body["items"]]
    assert ranks == sorted(ranks, reverse=True)
    for item in body["items"]:
        assert any(
            seg["match"] and seg["text"].lower().startswith("composition")
            for seg in item["snippet"]
        )
        assert "<mark>" in item["snippet_html"]
    html_hit = next(i for i in body["items"] if i["sae"] == "tiny-topk")
    assert (
        "<script>" not in html_hit["snippet_html"] and "&lt;script&gt;" in html_hit["snippet_html"]
    )
    assert unit(html_hit) == {"kind": "latent", "index": 4}  # TopK: no coordinates
    # paging
    page = api.client.get(SEARCH, params={"q": "composition", "limit": 1, "offset": 1}).json()
    assert page["total"] == 3 and [i["id"] for i in page["items"]] == [body["items"][1]["id"]]
    # phrase, OR, exclusion, one SAE, kind
    assert api.client.get(SEARCH, params={"q": '"function composition"'}).json()["total"] == 1
    assert api.client.get(SEARCH, params={"q": "cats OR mathematics"}).json()["total"] == 2
    assert api.client.get(SEARCH, params={"q": "composition -mathematics"}).json()["total"] == 2
    assert (
        api.client.get(SEARCH, params={"q": "composition", "sae": "tiny-topk"}).json()["total"] == 1
    )
    assert api.client.get(SEARCH, params={"q": "composition", "kind": "base"}).json()["total"] == 0
    assert api.client.get(SEARCH, params={"q": "composition", "sae": "nope"}).status_code == 404


HOSTILE = [
    "'; DROP TABLE explanation; --",
    '"unterminated',
    "NEAR(composition cats, 2)",
    "composition*",
    "^composition",
    "text:composition",
    "(composition",
    "AND OR NOT",
    "-",
    '""',
    "OR",
    "🦊🦊",
    "\\x00 %s %d {0}",
    "composition\x00",
    "a" * 999,
    "<script>alert(1)</script>",
    "composition & cats | !mAND",
    "e'e:*",
]


def test_hostile_search_queries_never_fail(api: Api) -> None:
    write(api, "tiny-kron", 7, "composition of cats")
    for q in HOSTILE:
        r = api.client.get(SEARCH, params={"q": q})
        assert r.status_code == 200, (q, r.text)
        body = r.json()
        assert isinstance(body["items"], list) and body["total"] >= 0
    assert api.client.get(SEARCH, params={"q": "composition"}).json()["total"] == 1  # table intact
    assert api.client.get(SEARCH, params={"q": "composition*"}).json()["total"] == 1


def test_search_limits(api: Api) -> None:
    assert api.client.get(SEARCH, params={"q": "x" * 1001}).status_code == 422
    assert api.client.get(SEARCH, params={"q": "x", "limit": 0}).status_code == 422
    assert api.client.get(SEARCH).status_code == 422
    assert api.client.get(SEARCH, params={"q": ""}).json() == {
        "items": [],
        "total": 0,
        "limit": 20,
        "offset": 0,
        "query": "",
    }


# -- generation jobs -------------------------------------------------------------------------------
def start(api: Api, slug: str, **body: Any) -> Any:
    return api.client.post(f"/api/v1/saes/{slug}/explain", json=body, headers=api.headers)


def explanations_of(api: Api) -> list[tuple[int, int, str, str, str | None]]:
    with api.sessions() as s:
        rows = s.execute(
            sa.select(
                Explanation.unit_kind,
                Explanation.unit_index,
                Explanation.text,
                Explanation.source,
                Explanation.author,
            )
            .where(Explanation.deleted_at.is_(None))
            .order_by(Explanation.unit_kind, Explanation.unit_index, Explanation.id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_heuristic_job_explains_parents_then_latents(api: Api) -> None:
    assert start(api, "tiny-kron").status_code == 409  # no harvest yet
    api.harvest("tiny-kron")
    human = write(api, "tiny-kron", 0, "a human wrote this")
    r = start(api, "tiny-kron", backend="heuristic", units="all")
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert job["kind"] == "explain" and job["progress"]["total"] == 64 + 16 + 32
    done = api.wait_job(job["id"])
    assert done["status"] == "complete", done
    assert (
        "111 explanations written" in done["message"]
        and "1 units already explained" in done["message"]
    )
    rows = explanations_of(api)
    assert len(rows) == 112
    generated = [r for r in rows if r[3] == "heuristic"]
    assert len(generated) == 111 and all(r[4] == "alice" for r in generated)
    parents = {(r[0], r[1]): r[2] for r in generated if r[0] != 0}
    assert len(parents) == 48 and all(t.startswith("fires on 'tok") for t in parents.values())
    latent_5 = next(r[2] for r in generated if r[0] == 0 and r[1] == 5)  # head 0, base 1, ext 1
    assert latent_5.startswith("fires on 'tok")
    assert f'base h0/b1: "{parents[(1, 1)][:40]}' in latent_5
    assert "extension h0/e1: " in latent_5 and latent_5.endswith("fires when both")
    assert (0, 0, "a human wrote this", "human", "alice") in rows
    # run again: nothing to do without overwrite; with it, unchanged texts get no revision
    before = n_explanations(api)
    again = api.wait_job(start(api, "tiny-kron", units="all").json()["job"]["id"])
    assert again["status"] == "complete" and "0 explanations written" in again["message"]
    over = api.wait_job(start(api, "tiny-kron", units="all", overwrite=True).json()["job"]["id"])
    assert over["status"] == "complete"
    assert "0 explanations written, 0 revised, 1 units already explained" in over["message"]
    assert n_explanations(api) == before
    assert api.client.get(LATENT.format("tiny-kron", 0)).json()["items"][0]["text"] == human["text"]


def test_explain_request_checks(api: Api) -> None:
    api.harvest("tiny-topk")
    r = start(api, "tiny-topk", backend="llm")
    assert r.status_code == 422 and "LLM" in r.json()["error"]["message"]
    assert start(api, "tiny-topk", units="parents").status_code == 422
    assert start(api, "tiny-topk", backend="magic").status_code == 422
    assert api.client.post("/api/v1/saes/tiny-topk/explain", json={}).status_code == 401
    jobs_only = api.new_key("dave", ["jobs"])
    r = api.client.post("/api/v1/saes/tiny-topk/explain", json={}, headers={"X-API-Key": jobs_only})
    assert r.status_code == 403
    first = start(api, "tiny-topk", units="latents")
    assert first.status_code == 202
    api.wait_job(first.json()["job"]["id"])
    rows = explanations_of(api)
    assert len(rows) == 48 and {r[3] for r in rows} == {"heuristic"}


@pytest.fixture
def fake_llm() -> Any:
    with FakeOpenAI() as server:
        yield server


def llm_api(make_api: Any, fake: FakeOpenAI, **overrides: Any) -> Api:
    values = {
        "llm_url": fake.url,
        "llm_model": "fake-model",
        "llm_api_key": "sk-test",
        "llm_timeout_s": 0.5,
    }
    values.update(overrides)
    api: Api = make_api(**values)
    api.harvest("tiny-kron")
    return api


def test_llm_job_success(make_api: Any, fake_llm: FakeOpenAI) -> None:
    api = llm_api(make_api, fake_llm)
    write(api, "tiny-kron", 1, "already explained by a person")
    job = api.wait_job(
        start(api, "tiny-kron", backend="llm", units="latents", limit=5).json()["job"]["id"]
    )
    assert job["status"] == "complete", job
    assert len(fake_llm.requests) == 4  # latent 1 was skipped
    assert set(fake_llm.auth) == {"Bearer sk-test"}
    body = fake_llm.requests[0]
    assert body["model"] == "fake-model" and body["messages"][0]["role"] == "system"
    assert (
        "<<" in body["messages"][1]["content"]
        and "AND of two parent features" in body["messages"][1]["content"]
    )
    rows = [r for r in explanations_of(api) if r[3] != "human"]
    assert [(r[1], r[3], r[4]) for r in rows] == [
        (i, "llm:fake-model", "alice") for i in (0, 2, 3, 4)
    ]
    assert rows[0][2] == "mentions of things near latent 0 (head 0, base 0, extension 0)"  # cleaned


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("slow", "did not answer within 0.5 s"),
        ("error", "answered HTTP 500"),
        ("garbage", "not JSON"),
        ("wrong_shape", "not a chat completion"),
        ("empty", "the answer is empty"),
    ],
)
def test_llm_job_failures_write_nothing(
    make_api: Any, fake_llm: FakeOpenAI, mode: str, reason: str
) -> None:
    api = llm_api(make_api, fake_llm)
    write(api, "tiny-kron", 9, "a person's explanation")
    before = explanations_of(api)
    fake_llm.mode = "ok_then"  # the first answers are fine, then it goes wrong
    fake_llm.ok_count = 3
    fake_llm.then = mode
    job = api.wait_job(
        start(api, "tiny-kron", backend="llm", units="latents", limit=8).json()["job"]["id"]
    )
    assert job["status"] == "failed", job
    assert reason in job["error"] and "nothing was written" in job["error"]
    assert "latent 3" in job["error"]  # names the unit that failed
    assert "sk-test" not in job["error"]
    assert len(fake_llm.requests) >= 4
    assert explanations_of(api) == before  # the three good answers were not written either


def test_llm_retries_then_succeeds(make_api: Any, fake_llm: FakeOpenAI) -> None:
    api = llm_api(make_api, fake_llm, llm_max_retries=1)
    fake_llm.mode = "ok_then"
    fake_llm.ok_count = 0
    fake_llm.then = "error"
    job = api.wait_job(start(api, "tiny-kron", backend="llm", limit=1).json()["job"]["id"])
    assert job["status"] == "failed" and "tried 2 times" in job["error"]
    fake_llm.requests.clear()
    fake_llm.mode = "ok"
    job = api.wait_job(start(api, "tiny-kron", backend="llm", limit=1).json()["job"]["id"])
    assert job["status"] == "complete" and len(fake_llm.requests) == 1


def test_explain_command_line(api: Api) -> None:
    from typer.testing import CliRunner

    from kronscope.cli import app as cli_app

    url = api.engine_db.url.render_as_string(hide_password=False)
    runner = CliRunner()
    out = runner.invoke(cli_app, ["explain", "tiny-kron", "--units", "parents", "--url", url])
    assert (
        out.exit_code == 1
        and "no complete harvest" in out.output
        and "nothing was written" in out.output
    )
    api.harvest("tiny-kron")
    args = ["explain", "tiny-kron", "--units", "parents", "--author", "cli-bob", "--url", url]
    out = runner.invoke(cli_app, args)
    assert out.exit_code == 0, out.output
    assert "48 explanations written" in out.output
    rows = explanations_of(api)
    assert len(rows) == 48 and {(r[3], r[4]) for r in rows} == {("heuristic", "cli-bob")}
    assert {r[0] for r in rows} == {1, 2}  # base and extension parents only
    out = runner.invoke(cli_app, ["explain", "nope", "--url", url])
    assert out.exit_code == 2 and "no SAE named" in out.output
    out = runner.invoke(cli_app, ["explain", "tiny-kron", "--backend", "magic", "--url", url])
    assert out.exit_code == 2
