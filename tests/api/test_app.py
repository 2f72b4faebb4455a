"""The app as a whole: one error shape everywhere, health, OpenAPI and docs."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"code", "message", "detail"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["detail"], dict)
    if code is not None:
        assert err["code"] == code
    return err


def test_health(client: TestClient) -> None:
    r = client.get("/api/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["ready"] and body["live"]
    assert body["database"]["reachable"] and body["database"]["revision"]
    assert body["device"] == "cpu"
    assert body["version"]
    assert body["jobs"] == {"in_process": False, "alive": False}
    assert client.get("/api/v1/health/ready").status_code == 200


def test_openapi_and_docs(client: TestClient) -> None:
    r = client.get("/api/v1/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    paths = schema["paths"]
    for path in (
        "/api/v1/health",
        "/api/v1/saes",
        "/api/v1/saes/{sae}",
        "/api/v1/saes/{sae}/harvests",
        "/api/v1/jobs/{job}",
        "/api/v1/jobs/{job}/cancel",
        "/api/v1/saes/{sae}/latents",
        "/api/v1/saes/{sae}/latents/{index}",
        "/api/v1/saes/{sae}/parents/{kind}/{head}/{index}",
        "/api/v1/saes/{sae}/heads/{head}",
    ):
        assert path in paths, path
    # Errors are documented in our shape, not FastAPI's default validation model.
    latent = paths["/api/v1/saes/{sae}/latents/{index}"]["get"]
    assert latent["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    assert "multipart/form-data" in paths["/api/v1/saes"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("get", "/api/v1/nothing-here", 404, "not_found"),
        ("get", "/api/v2/saes", 404, "not_found"),
        ("put", "/api/v1/saes", 405, "method_not_allowed"),
        ("delete", "/api/v1/health", 405, "method_not_allowed"),
        ("get", "/api/v1/saes?limit=0", 422, "validation_error"),
        ("get", "/api/v1/saes?limit=abc", 422, "validation_error"),
        ("get", "/api/v1/saes?offset=-1", 422, "validation_error"),
        ("get", "/api/v1/saes/no-such-sae", 404, "not_found"),
        ("get", "/api/v1/jobs/no-such-job", 404, "not_found"),
    ],
)
def test_error_shape(client: TestClient, method: str, path: str, status: int, code: str) -> None:
    err = assert_error(client.request(method.upper(), path), status, code)
    if status == 422:
        assert "query parameter" in err["message"].lower()
        assert "must be" in err["message"]


def test_405_names_allowed_methods(client: TestClient) -> None:
    r = client.put("/api/v1/saes")
    assert_error(r, 405)
    assert "GET" in r.headers["allow"]


def test_malformed_json(client: TestClient, seeded: Any, auth: dict[str, str]) -> None:
    r = client.post(
        f"/api/v1/saes/{seeded.kron}/harvests",
        content=b'{"corpus": ',
        headers={**auth, "Content-Type": "application/json"},
    )
    err = assert_error(r, 400, "malformed_json")
    assert "not valid JSON" in err["message"]


def test_wrong_json_types_are_422_in_plain_words(
    client: TestClient, seeded: Any, auth: dict[str, str]
) -> None:
    r = client.post(f"/api/v1/saes/{seeded.kron}/harvests", json={"tokens": "many"}, headers=auth)
    err = assert_error(r, 422, "validation_error")
    assert "Body field 'tokens': must be a whole number" in err["message"]
    r = client.post(f"/api/v1/saes/{seeded.kron}/harvests", json=[1, 2], headers=auth)
    assert_error(r, 422, "validation_error")
    r = client.post(f"/api/v1/saes/{seeded.kron}/harvests", json={"surprise": 1}, headers=auth)
    assert_error(r, 422, "validation_error")


def test_wrong_content_type(client: TestClient, seeded: Any, auth: dict[str, str]) -> None:
    r = client.post(
        f"/api/v1/saes/{seeded.kron}/harvests",
        content=b"corpus=builtin",
        headers={**auth, "Content-Type": "application/x-www-form-urlencoded"},
    )
    err = assert_error(r, 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    r = client.post(
        "/api/v1/saes", content=b'{"a": 1}', headers={**auth, "Content-Type": "application/json"}
    )
    err = assert_error(r, 415, "unsupported_media_type")
    assert "multipart/form-data" in err["message"]


def test_json_body_over_limit(make_settings: Any, seeded: Any, auth: dict[str, str]) -> None:
    from kronscope.app import create_app

    with TestClient(create_app(make_settings(max_json_bytes=64))) as c:
        r = c.post(
            f"/api/v1/saes/{seeded.kron}/harvests",
            json={"corpus": "x" * 200},
            headers=auth,
        )
        assert_error(r, 413, "payload_too_large")
