"""Suite 1: malformed uploads through the real HTTP API are refused (4xx, one error shape,
a message in plain words) and store nothing (see ``reliability.uploads``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kronscope.app import create_app

from ._support import SuiteResult, scratch_database
from .uploads import make_keys, run_upload_suite, upload_settings

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]


# SQLite here (quick); ``benchmarks/reliability.py`` sends the same corpus to a live server
# on PostgreSQL. ``KRONSCOPE_RELIABILITY_UPLOAD_BACKENDS=sqlite,postgresql`` runs both here.
BACKENDS = [
    pytest.param(b, marks=[pytest.mark.postgres] if b == "postgresql" else [])
    for b in os.environ.get("KRONSCOPE_RELIABILITY_UPLOAD_BACKENDS", "sqlite").split(",")
    if b
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_uploads_are_refused_and_store_nothing(
    backend: str,
    request: pytest.FixtureRequest,
    rel_models_dir: Path,
    tmp_path: Path,
    suite_summary: Callable[[SuiteResult], None],
) -> None:
    pg_url = request.getfixturevalue("rel_pg_url") if backend == "postgresql" else None
    # The database lives outside data_dir, so data_dir holds only what uploads store.
    with scratch_database(backend, tmp_path / "db", pg_url) as db_url:
        keys = make_keys(db_url)
        data_dir = tmp_path / "data"
        settings = upload_settings(db_url, data_dir, rel_models_dir)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            result = run_upload_suite(client, db_url, data_dir, keys, tmp_path / "work")
    result.line += f" [{backend}]"
    suite_summary(result)
    assert result.figures["tried"] >= 50
    assert result.ok, result.report(limit=60)
