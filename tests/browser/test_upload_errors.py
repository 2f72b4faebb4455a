"""Upload problems are shown in plain words, and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Server, make_checkpoint, sign_in


@pytest.fixture
def broken_folder(tmp_path: Path) -> Path:
    folder = make_checkpoint(tmp_path / "broken", seed=3)
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    cfg["d_sae"] = 65  # not h*m*n, and not the weights' shape
    (Path(folder) / "cfg.json").write_text(json.dumps(cfg))
    return Path(folder)


def _saes(server: Server) -> list[str]:
    return [s["slug"] for s in httpx.get(f"{server.url}/api/v1/saes", timeout=30).json()["items"]]


def test_upload_errors_are_plain_words(
    page: Any,
    server: Server,
    broken_folder: Path,
    tmp_path: Path,
    shoot: Callable[[Any, str], None],
) -> None:
    before = _saes(server)
    page.goto(f"{server.url}/upload")
    assert page.get_by_role("button", name="Upload").is_disabled()  # no key yet
    sign_in(page, server)
    page.goto(f"{server.url}/upload")

    page.get_by_role("button", name="Upload").click()
    status = page.locator("#upload-status")
    assert status.inner_text() == "Choose a checkpoint folder or an archive first."

    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    page.set_input_files("#upload-folder", str(empty))
    assert "none of a checkpoint's files" in page.locator("#upload-chosen").inner_text()

    page.set_input_files("#upload-folder", str(broken_folder))
    page.get_by_label("Start a harvest after the upload").uncheck()
    page.get_by_role("button", name="Upload").click()
    page.wait_for_function("() => document.querySelector('#upload-status.error')", timeout=60_000)
    message = status.inner_text()
    assert message.startswith("The checkpoint is not valid:"), message
    assert "Enter an API key" not in message
    shoot(page, "upload-error")
    assert _saes(server) == before  # nothing stored
