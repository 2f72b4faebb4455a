"""Suite 2: schemathesis over every operation of the seeded app: no 5xx (see
``reliability.schema``; the full-size walk is ``benchmarks/reliability.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kronscope.app import create_app

from ._support import SuiteResult
from .schema import run_schema_suite, seed_world
from .uploads import upload_settings

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("KRONSCOPE_RELIABILITY_SCHEMA_EXAMPLES", "5"))


def test_no_operation_answers_a_server_error(
    rel_models_dir: Path, tmp_path: Path, suite_summary: Callable[[SuiteResult], None]
) -> None:
    db_url = f"sqlite:///{tmp_path / 'schema.db'}"
    settings = upload_settings(
        db_url, tmp_path / "data", rel_models_dir, max_upload_bytes=256 * 1024
    )
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        world = seed_world(client, db_url, tmp_path / "ckpts")
        result = run_schema_suite(app, world, EXAMPLES)
    suite_summary(result)
    assert result.figures["operations"] >= 25
    assert result.ok, result.report(limit=40)
