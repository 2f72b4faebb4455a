"""Live inference through the real app: results equal direct computation with
``kronscope.sae``, concurrent requests are batched and each gets its own answer, the queue
is bounded, and texts, latents and broken models are handled in plain words."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kronscope.db.repositories import saes as sae_repo
from kronscope.lm import load_model
from kronscope.sae import KronSAE, load

from .conftest import HOOK, MODEL, Api

URL = "/api/v1/saes/{}/activations"
SEARCH = "/api/v1/saes/{}/search"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "KronSAE composes base and extension pre-latents with mAND.",
    "def add(a, b):\n    return a + b",
    "the cat sat on the mat",
]


@torch.no_grad()
def direct(api: Api, slug: str, text: str) -> dict[str, Any]:
    """What kronscope.lm + kronscope.sae give for ``text`` alone, without the server."""
    model = load_model(MODEL, device="cpu", settings=api.settings)
    sae = load(api.settings.data_dir / "saes" / slug)
    batch = model.tokenize([text])
    acts = model.activations(batch.input_ids, batch.attention_mask, HOOK)[0]
    out: dict[str, Any] = {
        "tokens": batch.tokens[0],
        "ids": batch.input_ids[0].tolist(),
        "sae": sae,
    }
    out["dense"] = sae.encode_dense(acts)
    if sae.sparse:
        out["values"], out["indices"] = sae.encode(acts)  # type: ignore[operator]
    else:
        top = out["dense"].topk(5, dim=-1)
        out["values"], out["indices"] = top.values, top.indices
    if isinstance(sae, KronSAE):
        out["p"], out["q"] = sae.parents(acts)
        out["all"] = sae.all_latents(acts)
    return out


def assert_matches(
    text_out: dict[str, Any], ref: dict[str, Any], top_k: int, latents: list[int]
) -> None:
    tokens = text_out["tokens"]
    assert [t["token"] for t in tokens] == ref["tokens"]
    assert [t["token_id"] for t in tokens] == ref["ids"]
    sae = ref["sae"]
    for pos, tok in enumerate(tokens):
        vals, idx = ref["values"][pos], ref["indices"][pos]
        want = [(int(i), float(v)) for v, i in zip(vals[:top_k], idx[:top_k], strict=True) if v > 0]
        got = [(e["index"], e["value"]) for e in tok["top_latents"]]
        assert [g[0] for g in got] == [w[0] for w in want], f"position {pos}"
        torch.testing.assert_close(
            torch.tensor([g[1] for g in got]),
            torch.tensor([w[1] for w in want]),
            atol=1e-4,
            rtol=1e-3,
        )
        if isinstance(sae, KronSAE):
            for e in tok["top_latents"]:
                assert (e["head"], e["base"], e["extension"]) == sae.coordinates(e["index"])
            p, q = ref["p"][pos].flatten(), ref["q"][pos].flatten()
            pb = p.topk(top_k)
            got_b = [(b["head"] * sae.m + b["index"], b["value"]) for b in tok["parents"]["base"]]
            want_b = [
                (int(i), float(v)) for v, i in zip(pb.values, pb.indices, strict=True) if v > 0
            ]
            assert [g[0] for g in got_b] == [w[0] for w in want_b]
            qb = q.topk(top_k)
            got_e = [
                (b["head"] * sae.n + b["index"], b["value"]) for b in tok["parents"]["extension"]
            ]
            want_e = [
                (int(i), float(v)) for v, i in zip(qb.values, qb.indices, strict=True) if v > 0
            ]
            assert [g[0] for g in got_e] == [w[0] for w in want_e]
        for e, index in zip(tok.get("latents") or [], latents, strict=True):
            assert e["index"] == index
            assert e["value"] == pytest.approx(float(ref["dense"][pos, index]), abs=1e-4)
            if isinstance(sae, KronSAE):
                g, i, j = sae.coordinates(index)
                assert e["base_value"] == pytest.approx(float(ref["p"][pos, g, i]), abs=1e-4)
                assert e["extension_value"] == pytest.approx(float(ref["q"][pos, g, j]), abs=1e-4)
                assert e["pre_topk"] == pytest.approx(float(ref["all"][pos, index]), abs=1e-4)


def test_kronsae_activations_equal_direct_computation(api: Api) -> None:
    latents = [0, 17, 63]
    r = api.client.post(
        URL.format("tiny-kron"), json={"texts": TEXTS[:3], "latents": latents, "top_k_per_token": 5}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sae"] == "tiny-kron" and body["architecture"] == "kronsae"
    assert len(body["texts"]) == 3
    for text, out in zip(TEXTS[:3], body["texts"], strict=True):
        ref = direct(api, "tiny-kron", text)
        assert out["n_tokens"] == len(ref["tokens"])
        assert_matches(out, ref, 5, latents)
        assert out["tokens"][0]["special"] is True  # the BOS
        assert not any(t["special"] for t in out["tokens"][1:])
    # some requested latent is really kept somewhere (the comparison is not all zeros)
    assert any(
        e["value"] > 0 for t in body["texts"] for tok in t["tokens"] for e in tok["top_latents"]
    )


@pytest.mark.parametrize("slug", ["tiny-topk", "tiny-jump"])
def test_other_architectures_equal_direct_computation(make_api: Any, slug: str) -> None:
    api = make_api(register=(slug,))
    r = api.client.post(
        URL.format(slug), json={"text": TEXTS[0], "latents": [1, 5], "top_k_per_token": 4}
    )
    assert r.status_code == 200, r.text
    out = r.json()["texts"][0]
    assert_matches(out, direct(api, slug, TEXTS[0]), 4, [1, 5])
    assert all("parents" not in t for t in out["tokens"])
    assert all("head" not in e for t in out["tokens"] for e in t["top_latents"])


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(api: Api) -> None:
    words = ["alpha", "beta", "gamma", "delta", "fox", "dog", "cat", "mat", "lists", "tuples"]
    words += ["numbers", "pieces"]
    texts = [
        f"{words[i % 12]} {words[(i * 5) % 12]} number {i} and {words[(i * 7) % 12]}"
        for i in range(32)
    ]

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", timeout=120
        ) as client:
            return await asyncio.gather(
                *(
                    client.post(URL.format("tiny-kron"), json={"text": t, "top_k_per_token": 8})
                    for t in texts
                )
            )

    responses = asyncio.run(main())
    for text, r in zip(texts, responses, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()["texts"][0]
        assert_matches(out, direct(api, "tiny-kron", text), 8, [])
    counters = api.client.get("/api/v1/inference/status").json()["counters"]
    assert counters["requests"] >= 32
    assert counters["multi_request_batches"] >= 1, counters
    assert counters["max_requests_in_batch"] > 1
    assert counters["batches"] < counters["requests"]


@pytest.mark.parametrize("settings_overrides", [{"inference_queue_size": 2}])
def test_full_queue_is_503_with_retry_after(api: Api) -> None:
    assert api.client.post(URL.format("tiny-kron"), json={"text": "warm up"}).status_code == 200
    engine = api.engine

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", timeout=60
        ) as client:
            with engine.paused():
                tasks = [
                    asyncio.ensure_future(
                        client.post(URL.format("tiny-kron"), json={"text": f"text {i}"})
                    )
                    for i in range(6)
                ]
                for _ in range(500):  # until the queue is full and the rest were refused
                    await asyncio.sleep(0.01)
                    if sum(t.done() for t in tasks) >= 3 and engine._queue.full():
                        break
            return await asyncio.gather(*tasks)

    responses = asyncio.run(main())
    busy = [r for r in responses if r.status_code == 503]
    ok = [r for r in responses if r.status_code == 200]
    assert busy and ok and len(busy) + len(ok) == 6
    for r in busy:
        assert r.headers["Retry-After"].isdigit()
        err = r.json()["error"]
        assert err["code"] == "unavailable" and "busy" in err["message"]
    assert api.client.get("/api/v1/inference/status").json()["counters"]["rejected_busy"] == len(
        busy
    )


@pytest.mark.parametrize("settings_overrides", [{"inference_max_text_bytes": 200}])
def test_text_limits_and_empty_texts(api: Api) -> None:
    post = lambda body: api.client.post(URL.format("tiny-kron"), json=body)  # noqa: E731
    r = post({"text": "x" * 201})
    assert r.status_code == 413 and "200 bytes" in r.json()["error"]["message"]
    r = post({"texts": ["y" * 150, "z" * 60]})
    assert r.status_code == 413
    r = post({"text": "é" * 101})  # 202 bytes of UTF-8, 101 characters
    assert r.status_code == 413
    # over the token limit (the tiny model has 64 positions) but under the byte limit
    r = post({"text": " ".join("q" for _ in range(90))})
    assert r.status_code == 422 and "tokens" in r.json()["error"]["message"]
    empty: list[dict[str, Any]] = [
        {"text": ""},
        {"text": "   \n\t "},
        {"texts": ["ok", " "]},
        {"texts": []},
    ]
    for body in empty:
        r = post(body)
        assert r.status_code == 422, body
        assert (
            "empty" in r.json()["error"]["message"] or "non-empty" in r.json()["error"]["message"]
        )
    wrong: list[dict[str, Any]] = [
        {},
        {"text": "a", "texts": ["b"]},
        {"text": 5},
        {"text": "a", "bogus": 1},
    ]
    for body in wrong:
        r = post(body)
        assert r.status_code == 422, body
        assert r.json()["error"]["message"]
    r = post({"texts": ["a"] * (api.settings.inference_max_texts + 1)})
    assert r.status_code == 422 and "at most" in r.json()["error"]["message"]


def _decode_tokens(tokens: list[str]) -> str:
    """Join token strings; byte pieces shown as ``\\xNN`` become their bytes again."""
    out = bytearray()
    for t in tokens:
        for part in re.split(r"(\\x[0-9a-f]{2})", t):
            if re.fullmatch(r"\\x[0-9a-f]{2}", part):
                out.append(int(part[2:], 16))
            else:
                out += part.encode("utf-8")
    return out.decode("utf-8", "replace")


def test_any_script_emoji_and_binary_text(api: Api) -> None:
    text = "Hi 👋🏽 世界 مرحبا שלום <b>&</b>"
    r = api.client.post(URL.format("tiny-kron"), json={"text": text})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    tokens = [t["token"] for t in r.json()["texts"][0]["tokens"]]
    assert tokens[0] == "<|endoftext|>"
    assert _decode_tokens(tokens[1:]) == text  # tokens come back as-is, not escaped
    assert "<b>&</b>" in "".join(tokens)
    # NUL is refused; a lone surrogate (valid JSON, not encodable) becomes U+FFFD
    r = api.client.post(URL.format("tiny-kron"), json={"text": "before\x00after"})
    assert r.status_code == 422 and "NUL" in r.json()["error"]["message"]
    raw = b'{"text": "lone \\ud800 surrogate"}'
    r = api.client.post(
        URL.format("tiny-kron"), content=raw, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert "\ufffd" in _decode_tokens([t["token"] for t in r.json()["texts"][0]["tokens"]])
    # bytes that are not UTF-8 at all: a client error, never a 500
    r = api.client.post(
        URL.format("tiny-kron"),
        content=b'{"text": "\xff\xfe\x00bin"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["message"]
    r = api.client.post(
        URL.format("tiny-kron"), content=b"\x89PNG\r\n", headers={"Content-Type": "image/png"}
    )
    assert r.status_code == 415


def test_latent_and_parameter_errors_are_plain(api: Api) -> None:
    post = lambda body, slug="tiny-kron": api.client.post(URL.format(slug), json=body)  # noqa: E731
    r = post({"text": "a", "latents": [64]})
    assert r.status_code == 422
    assert (
        r.json()["error"]["message"] == "Latent 64 is out of range: tiny-kron has latents 0 to 63."
    )
    r = post({"text": "a", "latents": [-1]})
    assert r.status_code == 422 and "out of range" in r.json()["error"]["message"]
    r = post({"text": "a", "top_k_per_token": 65})
    assert r.status_code == 422 and "top_k_per_token" in r.json()["error"]["message"]
    r = post({"text": "a"}, slug="no-such-sae")
    assert r.status_code == 404 and "no-such-sae" in r.json()["error"]["message"]
    r = post({"text": "a", "top_k_per_token": 0})
    assert r.status_code == 200
    assert all(t["top_latents"] == [] for t in r.json()["texts"][0]["tokens"])


def test_unloadable_models_fail_alone(api: Api, tmp_path: Path, tiny_models_dir: Path) -> None:
    # A model folder that resolves (config.json) but cannot be loaded: 503.
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken-lm").mkdir()
    (models / "broken-lm" / "config.json").write_text(
        '{"model_type": "gpt2", "this is": "not loadable"'
    )
    shutil.copytree(tiny_models_dir / MODEL, models / MODEL)
    api.settings.models_dir = models
    api.register("tiny-broken", source="tiny-kron-2", model_name="broken-lm")
    # An SAE whose model name resolves to nothing on this server: 422.
    with api.sessions() as s:
        row = sae_repo.get_sae_by_slug(s, "tiny-broken")
        assert row is not None
        sae_repo.create_sae(
            s, slug="tiny-unknown", architecture=row.architecture, d_in=row.d_in, d_sae=row.d_sae,
            file_hash="0" * 64, storage_path=row.storage_path, cfg=row.cfg, k=row.k, h=row.h,
            m=row.m, n=row.n, composition=row.composition, model_name="never-heard-of-it",
            hook_name=HOOK,
        )  # fmt: skip
        s.commit()

    r = api.client.post(URL.format("tiny-broken"), json={"text": "hello"})
    assert r.status_code == 503, r.text
    assert "broken-lm" in r.json()["error"]["message"] and r.headers["Retry-After"].isdigit()
    r = api.client.post(URL.format("tiny-unknown"), json={"text": "hello"})
    assert r.status_code == 422
    assert "never-heard-of-it" in r.json()["error"]["message"]
    # the others keep answering, before and after another failed try
    r = api.client.post(URL.format("tiny-kron"), json={"text": "hello"})
    assert r.status_code == 200
    assert api.client.post(URL.format("tiny-broken"), json={"text": "again"}).status_code == 503
    assert api.client.post(SEARCH.format("tiny-topk"), json={"text": "hello"}).status_code == 200


def test_search_ranks_by_max_or_sum(api: Api) -> None:
    text = TEXTS[0]
    ref = direct(api, "tiny-kron", text)
    dense = ref["dense"][1:]  # the BOS (special) does not count by default
    for rank_by, score in (("max", dense.max(0).values), ("sum", dense.sum(0))):
        r = api.client.post(
            SEARCH.format("tiny-kron"), json={"text": text, "rank_by": rank_by, "limit": 10}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["positions"] == list(range(1, len(ref["tokens"])))
        assert body["total"] == int((dense > 0).any(0).sum())
        want = torch.argsort(score, descending=True, stable=True)[:10].tolist()
        got = [i["index"] for i in body["items"]]
        assert got == want
        for item in body["items"]:
            assert item["score"] == pytest.approx(float(score[item["index"]]), abs=1e-4)
            column = ref["dense"][:, item["index"]]
            assert item["max_position"] == int(column[1:].argmax()) + 1
            assert item["max_token"] == ref["tokens"][item["max_position"]]
            assert item["n_active"] == int((column[1:] > 0).sum())
            assert (item["head"], item["base"], item["extension"]) == ref["sae"].coordinates(
                item["index"]
            )


def test_search_positions_explanations_and_errors(api: Api) -> None:
    text = TEXTS[1]
    ref = direct(api, "tiny-kron", text)
    r = api.client.post(
        SEARCH.format("tiny-kron"), json={"text": text, "positions": [0, 3], "limit": 500}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["positions"] == [0, 3]
    firing = (ref["dense"][[0, 3]] > 0).any(0)
    assert {i["index"] for i in body["items"]} == set(torch.nonzero(firing).flatten().tolist())
    assert all(i["max_position"] in (0, 3) for i in body["items"])
    best = body["items"][0]["index"]
    created = api.client.post(
        f"/api/v1/saes/tiny-kron/latents/{best}/explanations",
        json={"text": "fires on mAND"},
        headers=api.headers,
    )
    assert created.status_code == 201
    r = api.client.post(SEARCH.format("tiny-kron"), json={"text": text, "positions": [0, 3]})
    assert r.json()["items"][0]["explanation"] == "fires on mAND"
    r = api.client.post(SEARCH.format("tiny-kron"), json={"text": text, "positions": [999]})
    assert r.status_code == 422 and "out of range" in r.json()["error"]["message"]
    r = api.client.post(SEARCH.format("tiny-kron"), json={"text": text, "rank_by": "mean"})
    assert r.status_code == 422


def test_dense_sae_search_equals_direct(make_api: Any) -> None:
    api = make_api(register=("tiny-jump",))
    ref = direct(api, "tiny-jump", TEXTS[2])
    dense = ref["dense"][1:]
    r = api.client.post(
        SEARCH.format("tiny-jump"), json={"text": TEXTS[2], "rank_by": "sum", "limit": 40}
    )
    assert r.status_code == 200
    items = r.json()["items"]
    score = dense.clamp_min(0).sum(0)
    assert [i["index"] for i in items] == [
        int(i) for i in torch.argsort(score, descending=True, stable=True)[: len(items)]
    ]
    assert r.json()["total"] == int((dense > 0).any(0).sum())
    for item in items:
        assert item["max_position"] == int(ref["dense"][1:, item["index"]].argmax()) + 1


def test_status_and_openapi(api: Api) -> None:
    status = api.client.get("/api/v1/inference/status").json()
    assert status["device"] == "cpu" and status["queue_size"] == api.settings.inference_queue_size
    spec = api.client.get("/api/v1/openapi.json").json()
    for path in ("/api/v1/saes/{sae}/activations", "/api/v1/saes/{sae}/search"):
        assert "post" in spec["paths"][path]
    assert json.dumps(spec)  # serialisable
