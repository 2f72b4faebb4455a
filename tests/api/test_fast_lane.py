"""The fast lane (``api.fast_lane``) answers exactly as the documented routes do: the same
status, body bytes and content type for every request it serves, and it leaves every
request it cannot read simply (or that carries a cookie, or needs a key) to the app."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kronscope.api import fast_lane
from kronscope.app import create_app

from .test_app import assert_error


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths the fast lane served itself (each call of its page read)."""
    seen: list[str] = []
    original = fast_lane._read

    def spy(scope: Any) -> Any:
        read = original(scope)
        if read is not None:
            seen.append(scope["path"] + "?" + scope["query_string"].decode())
        return read

    monkeypatch.setattr(fast_lane, "_read", spy)
    yield seen


def _both(client: TestClient, url: str) -> tuple[Any, Any]:
    """The response through the fast lane, and the app's own (a cookie sends it there)."""
    fast = client.get(url)
    slow = client.get(url, headers={"Cookie": "unrelated=1"})
    return fast, slow


def _same(fast: Any, slow: Any) -> None:
    assert fast.status_code == slow.status_code
    assert fast.headers["content-type"] == slow.headers["content-type"]
    assert fast.content == slow.content
    if "retry-after" in slow.headers:
        assert fast.headers["retry-after"] == slow.headers["retry-after"]


SERVED = [
    "latents",
    "latents?sort=density",
    "latents?sort=density&order=asc&limit=3&offset=2",
    "latents?sort=max_activation&order=desc",
    "latents?sort=index&order=desc&limit=500",
    "latents?min_density=0.01&max_density=0.5",
    "latents?min_density=0&max_density=1",
    "latents?head=1",
    "latents?head=1&sort=density&limit=2",
    "latents?offset=100",
    "latents?unknown=3&limit=4",
    "latents/5",
    "latents/0",
    "latents/15",
    "latents/005",
    "latents/5?top_k=0",
    "latents/5?top_k=1&intervals=1",
    "latents/5?intervals=0",
    "latents/5?mode=quantile&intervals=3&per_interval=1",
    "latents/5?top_k=100&intervals=20&per_interval=50",
    "latents/16",
    "latents/-1",
    "latents/99999999999",
]


@pytest.mark.parametrize("path", SERVED)
def test_served_requests_equal_the_routes(
    client: TestClient, seeded: Any, served: list[str], path: str
) -> None:
    for slug in (seeded.kron, seeded.topk, seeded.unharvested):
        url = f"/api/v1/saes/{slug}/{path}"
        served.clear()
        fast, slow = _both(client, url)
        assert len(served) == 1, "the fast lane should have served it"
        _same(fast, slow)


@pytest.mark.parametrize("path", ["latents", "latents/3"])
def test_unknown_sae(client: TestClient, served: list[str], path: str) -> None:
    fast, slow = _both(client, f"/api/v1/saes/no-such-sae/{path}")
    assert served, "the fast lane should have served it"
    assert_error(fast, 404)
    _same(fast, slow)


REFERRED = [
    "latents?limit=0",
    "latents?limit=501",
    "latents?limit=abc",
    "latents?limit=",
    "latents?limit=1&limit=2",
    "latents?offset=-1",
    "latents?head=-1",
    "latents?sort=bogus",
    "latents?order=up",
    "latents?min_density=2",
    "latents?min_density=1e-3",
    "latents?min_density=nan",
    "latents?max_density=.5",
    "latents?q=zebra",
    "latents?has_explanation=true",
    "latents?has_explanation=false&sort=density",
    "latents/abc",
    "latents/5.0",
    "latents/5?top_k=101",
    "latents/5?top_k=-1",
    "latents/5?mode=both",
    "latents/5?per_interval=0",
    "latents/5?intervals=21",
    "latents/5?top_k=1&top_k=2",
]


@pytest.mark.parametrize("path", REFERRED)
def test_other_requests_go_to_the_app(
    client: TestClient, seeded: Any, served: list[str], path: str
) -> None:
    url = f"/api/v1/saes/{seeded.kron}/{path}"
    fast, slow = _both(client, url)
    assert served == []
    _same(fast, slow)


def test_a_trailing_slash_is_the_apps_redirect(
    client: TestClient, seeded: Any, served: list[str]
) -> None:
    r = client.get(f"/api/v1/saes/{seeded.kron}/latents/5/", follow_redirects=False)
    assert r.status_code == 307 and served == []


def test_long_slug_goes_to_the_app(client: TestClient, served: list[str]) -> None:
    fast = client.get(f"/api/v1/saes/{'s' * 129}/latents")
    assert served == []
    assert_error(fast, 422)


def test_cookies_other_methods_and_paths_go_to_the_app(
    client: TestClient, seeded: Any, served: list[str]
) -> None:
    base = f"/api/v1/saes/{seeded.kron}"
    client.get(f"{base}/latents", headers={"Cookie": "kronscope_session=abc"})
    assert client.head(f"{base}/latents").status_code == 405
    client.get(f"{base}/heads/0")
    client.get(f"{base}/parents/base/0/0")
    client.get(f"{base}")
    assert served == []


def test_key_required_for_reads(make_settings: Any, seeded: Any, served: list[str]) -> None:
    """With reads behind a key, the app checks the key; the fast lane stays out."""
    settings = make_settings(require_key_for_reads=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert_error(c.get(f"/api/v1/saes/{seeded.kron}/latents/5"), 401)
    assert served == []


def test_an_unexpected_error_is_the_apps_to_render(
    client: TestClient, seeded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything but the service's own errors goes to the app, which logs and renders it."""
    from kronscope.services import features

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(features, "latent_detail", broken)
    r = client.get(f"/api/v1/saes/{seeded.kron}/latents/5")
    assert_error(r, 500)
