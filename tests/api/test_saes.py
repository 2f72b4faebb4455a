"""SAEs: list, get, delete, and uploads of every format, with every way an upload can fail
(and nothing stored when it does)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from kronscope.app import create_app

from .conftest import (
    PEERS,
    TINY_HOOK,
    TINY_MODEL,
    archive_bytes,
    folder_files,
    make_checkpoint,
    stored_state,
    upload,
)
from .test_app import assert_error

_seed_counter = iter(range(1000, 10**6))


def _fresh(tmp_path: Path, name: str = "ckpt", **kwargs: Any) -> Path:
    """A checkpoint with a seed no other test uses (uploads must not collide across tests)."""
    import os

    seed = next(_seed_counter) * 1000 + os.getpid() % 1000
    return make_checkpoint(tmp_path / name, seed=seed, **kwargs)


def test_list_and_get(client: TestClient, seeded: Any) -> None:
    r = client.get("/api/v1/saes?limit=500")
    assert r.status_code == 200
    body = r.json()
    assert body["total"] >= 3 and body["limit"] == 500 and body["offset"] == 0
    by_slug = {s["slug"]: s for s in body["items"]}
    kron = by_slug[seeded.kron]
    assert kron["architecture"] == "kronsae"
    assert (kron["d_in"], kron["d_sae"], kron["k"], kron["h"], kron["m"], kron["n"]) == (
        32,
        16,
        2,
        2,
        2,
        4,
    )
    assert kron["composition"] == "mand"
    assert kron["model"] == TINY_MODEL and kron["hook"] == TINY_HOOK
    assert kron["metrics"] == {"fvu": 0.25}
    assert kron["harvest_status"] == "complete"
    assert kron["active_harvest"]["active"] is True
    assert by_slug[seeded.unharvested]["harvest_status"] == "none"
    assert by_slug[seeded.unharvested]["active_harvest"] is None
    assert by_slug[seeded.topk]["h"] is None and by_slug[seeded.topk]["composition"] is None

    one = client.get(f"/api/v1/saes/{seeded.kron}")
    assert one.status_code == 200 and one.json() == kron

    page = client.get("/api/v1/saes?limit=1&offset=1").json()
    assert len(page["items"]) == 1 and page["total"] == body["total"]


def test_upload_native_folder_then_get_and_delete(
    client: TestClient,
    settings: Any,
    auth: dict[str, str],
    tmp_path: Path,
    db_factory: sessionmaker[Session],
) -> None:
    folder = _fresh(tmp_path)
    r = upload(client, folder, auth, slug="my-kron")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["slug"] == "my-kron"
    assert body["architecture"] == "kronsae" and body["d_sae"] == 16
    assert body["source_format"] == "kronscope"
    assert body["uploaded_by"] == "tester"
    assert body["harvest_status"] == "none" and body["job"] is None
    stored = settings.data_dir / "saes" / "my-kron"
    assert sorted(p.name for p in stored.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert json.loads((stored / "cfg.json").read_text())["metadata"]["model_name"] == TINY_MODEL
    assert not any((settings.data_dir / "tmp").iterdir())  # the received upload is gone

    assert client.get("/api/v1/saes/my-kron").json()["file_hash"] == body["file_hash"]

    # the same checkpoint again: 409 naming the existing slug
    again = upload(client, folder, auth)
    err = assert_error(again, 409, "conflict")
    assert "my-kron" in err["message"] and err["detail"]["existing_slug"] == "my-kron"

    # a taken slug
    other = _fresh(tmp_path, "other")
    taken = upload(client, other, auth, slug="my-kron")
    assert "taken" in assert_error(taken, 409)["message"]

    r = client.delete("/api/v1/saes/my-kron", headers=auth)
    assert r.status_code == 204 and r.content == b""
    assert not stored.exists()
    assert_error(client.get("/api/v1/saes/my-kron"), 404)
    assert_error(client.delete("/api/v1/saes/my-kron", headers=auth), 404)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_upload_archive(
    client: TestClient, auth: dict[str, str], tmp_path: Path, kind: str
) -> None:
    folder = _fresh(tmp_path, architecture="topk")
    data = archive_bytes(folder, kind)
    r = client.post(
        "/api/v1/saes",
        files=[("files", (f"ckpt.{kind}", data, "application/octet-stream"))],
        headers=auth,
    )
    assert r.status_code == 201, r.text
    assert r.json()["architecture"] == "topk"
    assert client.delete(f"/api/v1/saes/{r.json()['slug']}", headers=auth).status_code == 204


PEER_FORMATS = {
    "saelens_topk": ("saelens", "topk"),
    "saelens_topk_nobdec": ("saelens", "topk"),
    "saelens_jumprelu": ("saelens", "jumprelu"),
    "saelens_standard": ("saelens", "standard"),
    "sparsify_topk": ("sparsify", "topk"),
    "dictionary_learning_topk": ("dictionary_learning", "topk"),
}


@pytest.mark.parametrize("peer", sorted(PEER_FORMATS))
def test_upload_peer_formats(
    client: TestClient, settings: Any, auth: dict[str, str], peer: str
) -> None:
    folder = PEERS / peer
    # The peers name models this server does not have (gpt2) or none (sparsify): override.
    r = upload(client, folder, auth, model_name=TINY_MODEL, hook_name=TINY_HOOK)
    assert r.status_code == 201, r.text
    body = r.json()
    source, arch = PEER_FORMATS[peer]
    assert body["source_format"].startswith(source)
    assert body["architecture"] == arch
    assert body["d_in"] == 16 and body["d_sae"] == 64
    assert body["model"] == TINY_MODEL and body["hook"] == TINY_HOOK
    stored = settings.data_dir / "saes" / body["slug"]
    assert (stored / "cfg.json").is_file() and (stored / "sae_weights.safetensors").is_file()
    assert client.delete(f"/api/v1/saes/{body['slug']}", headers=auth).status_code == 204


def test_peer_without_model_name_needs_the_field(client: TestClient, auth: dict[str, str]) -> None:
    r = upload(client, PEERS / "sparsify_topk", auth)
    err = assert_error(r, 422)
    assert "model_name" in err["message"]


def _bad_cfg(folder: Path, **changes: Any) -> Path:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda f: _bad_cfg(f, d_sae=17), "d_sae"),
        (lambda f: _bad_cfg(f, architecture="gated"), "architecture"),
        (lambda f: _bad_cfg(f, k=0), "'k'"),
        (lambda f: (f / "cfg.json").write_text("{not json"), "cfg.json"),
        (
            lambda f: (f / "sae_weights.safetensors").write_bytes(b"\x00" * 20),
            "sae_weights.safetensors",
        ),
        (lambda f: (f / "sae_weights.safetensors").unlink(), "sae_weights.safetensors"),
        (
            lambda f: _bad_cfg(f, metadata={"model_name": "no-such-model", "hook_name": "h"}),
            "no-such-model",
        ),
        (lambda f: _bad_cfg(f, metadata={"model_name": "../etc", "hook_name": "h"}), "../etc"),
        (lambda f: _bad_cfg(f, metadata={"model_name": TINY_MODEL}), "hook_name"),
    ],
)
def test_invalid_checkpoint_is_422_and_nothing_is_stored(
    client: TestClient,
    settings: Any,
    auth: dict[str, str],
    tmp_path: Path,
    db_factory: sessionmaker[Session],
    mutate: Any,
    words: str,
) -> None:
    folder = _fresh(tmp_path)
    mutate(folder)
    before = stored_state(db_factory, settings.data_dir)
    r = upload(client, folder, auth)
    err = assert_error(r, 422)
    assert words in err["message"], err["message"]
    assert stored_state(db_factory, settings.data_dir) == before
    tmp = settings.data_dir / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


def test_bad_multipart_inputs(client: TestClient, auth: dict[str, str], tmp_path: Path) -> None:
    folder = _fresh(tmp_path)
    # an unexpected file name
    r = client.post(
        "/api/v1/saes", files=[("files", ("notes.txt", b"hi", "text/plain"))], headers=auth
    )
    assert "notes.txt" in assert_error(r, 422)["message"]
    # no files at all, only fields
    r = client.post(
        "/api/v1/saes",
        data={"slug": "x"},
        files=[("other", ("", b"", "text/plain"))],
        headers=auth,
    )
    assert r.status_code in (400, 422)
    r = client.post(
        "/api/v1/saes",
        content=b"",
        headers={**auth, "Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert_error(r, 422)
    # multipart without a boundary, and garbage multipart
    r = client.post(
        "/api/v1/saes", content=b"abc", headers={**auth, "Content-Type": "multipart/form-data"}
    )
    assert_error(r, 400)
    # a bad slug
    r = upload(client, folder, auth, slug="Bad Slug!")
    assert "slug" in assert_error(r, 422)["message"]
    # an archive together with files
    parts = [
        *folder_files(folder),
        ("files", ("x.zip", archive_bytes(folder, "zip"), "application/zip")),
    ]
    r = client.post("/api/v1/saes", files=parts, headers=auth)
    assert "archive" in assert_error(r, 422)["message"]
    # a file sent twice
    parts = folder_files(folder) + folder_files(folder)[:1]
    assert (
        "twice"
        in assert_error(client.post("/api/v1/saes", files=parts, headers=auth), 422)["message"]
    )
    # bad harvest fields
    r = upload(client, folder, auth, harvest_tokens="lots")
    assert "harvest_tokens" in assert_error(r, 422)["message"]
    r = upload(client, folder, auth, harvest="perhaps")
    assert_error(r, 422)
    r = upload(client, folder, auth, harvest_corpus="/etc/passwd")
    assert "Unknown corpus" in assert_error(r, 422)["message"]


def test_upload_over_the_limit_is_413_and_nothing_is_stored(
    make_settings: Any, auth: dict[str, str], tmp_path: Path, db_factory: sessionmaker[Session]
) -> None:
    settings = make_settings(max_upload_bytes=4096)
    folder = _fresh(tmp_path)
    before = stored_state(db_factory, settings.data_dir)
    with TestClient(create_app(settings)) as c:
        r = upload(c, folder, auth)
        err = assert_error(r, 413, "payload_too_large")
        assert "4,096" in err["message"]

        # without a Content-Length the stream is cut as soon as it passes the limit
        def chunks() -> Any:
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="cfg.json"\r\n\r\n'
            for _ in range(100):
                yield b"x" * 1024

        r = c.post(
            "/api/v1/saes",
            content=chunks(),
            headers={**auth, "Content-Type": "multipart/form-data; boundary=b"},
        )
        assert_error(r, 413)
    assert stored_state(db_factory, settings.data_dir) == before
    assert not any((settings.data_dir / "tmp").iterdir())


def test_derived_slugs_are_unique(client: TestClient, auth: dict[str, str], tmp_path: Path) -> None:
    slugs = []
    for name in ("a", "b"):
        r = upload(client, _fresh(tmp_path, name), auth)
        assert r.status_code == 201, r.text
        slugs.append(r.json()["slug"])
    assert slugs[0] != slugs[1]
    assert all(s.startswith("tiny-gpt2-transformer.h.1-kronsae-16") for s in slugs)
    for s in slugs:
        client.delete(f"/api/v1/saes/{s}", headers=auth)
