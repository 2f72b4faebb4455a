"""API keys: writes need a key with the right scope; reads are public unless configured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kronscope.app import create_app

from .conftest import Keys, make_checkpoint, upload
from .test_app import assert_error

WRITES = [
    ("post", "/api/v1/saes", "upload"),
    ("delete", "/api/v1/saes/{kron}", "delete"),
    ("post", "/api/v1/saes/{kron}/harvests", "jobs"),
    ("post", "/api/v1/jobs/some-job/cancel", "jobs"),
]


@pytest.mark.parametrize(("method", "path", "scope"), WRITES)
def test_writes_need_a_key(
    client: TestClient, seeded: Any, keys_: Keys, method: str, path: str, scope: str
) -> None:
    url = path.format(kron=seeded.kron)
    err = assert_error(client.request(method.upper(), url), 401, "unauthorized")
    assert "API key" in err["message"]
    r = client.request(method.upper(), url, headers={"Authorization": "Bearer ks_not-a-real-key"})
    assert "not valid" in assert_error(r, 401)["message"]
    r = client.request(method.upper(), url, headers={"X-API-Key": "nonsense"})
    assert_error(r, 401)
    r = client.request(method.upper(), url, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert_error(r, 401)
    r = client.request(method.upper(), url, headers=keys_.auth(keys_.revoked))
    assert "revoked" in assert_error(r, 401)["message"]
    wrong = keys_.explanations if scope != "explanations" else keys_.upload
    r = client.request(method.upper(), url, headers={"X-API-Key": wrong})
    err = assert_error(r, 403, "forbidden")
    assert scope in err["message"] and err["detail"]["required_scope"] == scope
    # The seeded SAE is still there after all that.
    assert client.get(f"/api/v1/saes/{seeded.kron}").status_code == 200


def test_scoped_key_works_with_either_header(
    client: TestClient, keys_: Keys, tmp_path: Path
) -> None:
    folder = make_checkpoint(tmp_path / "c", seed=424242)
    r = upload(client, folder, {"X-API-Key": keys_.upload}, slug="by-upload-key")
    assert r.status_code == 201, r.text
    assert r.json()["uploaded_by"] == "only-upload"
    # the upload key cannot delete; the delete key can
    assert_error(
        client.delete("/api/v1/saes/by-upload-key", headers={"X-API-Key": keys_.upload}), 403
    )
    assert (
        client.delete("/api/v1/saes/by-upload-key", headers=keys_.auth(keys_.delete)).status_code
        == 204
    )


def test_reads_public_unless_configured(make_settings: Any, seeded: Any, keys_: Keys) -> None:
    with TestClient(create_app(make_settings(require_key_for_reads=True))) as c:
        for path in (
            "/api/v1/saes",
            f"/api/v1/saes/{seeded.kron}/latents",
            f"/api/v1/saes/{seeded.kron}/latents/1",
        ):
            assert_error(c.get(path), 401)
            assert c.get(path, headers={"X-API-Key": keys_.jobs}).status_code == 200
        assert_error(c.get("/api/v1/saes", headers=keys_.auth(keys_.revoked)), 401)
        # health stays public: load balancers have no keys
        assert c.get("/api/v1/health").status_code == 200


def test_keys_cli(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from kronscope.cli import app
    from kronscope.config import get_settings

    settings = make_settings()
    monkeypatch.setenv("KRONSCOPE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("KRONSCOPE_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        r = runner.invoke(app, ["keys", "create", "--name", "cli-user", "--scopes", "upload,jobs"])
        assert r.exit_code == 0, r.output
        plain = r.stdout.strip().splitlines()[0]
        assert plain.startswith("ks_")
        bad = runner.invoke(app, ["keys", "create", "--name", "x", "--scopes", "upload,root"])
        assert bad.exit_code == 2 and "root" in bad.output

        listed = runner.invoke(app, ["keys", "list"])
        assert listed.exit_code == 0 and "cli-user" in listed.output and plain not in listed.output
        key_id = next(
            line.split("\t")[0] for line in listed.output.splitlines() if "cli-user" in line
        )

        with TestClient(create_app(settings)) as c:
            resp = c.post("/api/v1/jobs/nope/cancel", headers={"Authorization": f"Bearer {plain}"})
            assert resp.status_code == 404  # authenticated: the job does not exist
            assert runner.invoke(app, ["keys", "revoke", key_id]).exit_code == 0
            resp = c.post("/api/v1/jobs/nope/cancel", headers={"Authorization": f"Bearer {plain}"})
            assert resp.status_code == 401
        assert runner.invoke(app, ["keys", "revoke", "999999"]).exit_code == 2
    finally:
        get_settings.cache_clear()
