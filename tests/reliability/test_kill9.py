"""Suite 3: kill -9 of the worker during a harvest and of the server during explanation
edits: the job resumes or fails cleanly, no acknowledged edit is lost (see
``reliability.kill9``). On PostgreSQL when ``KRONSCOPE_TEST_POSTGRES_URL`` is set, else on
SQLite."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ._support import SuiteResult, pg_base_url, pg_reachable, scratch_database
from .kill9 import run_kill9_suite

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

KILLS = int(os.environ.get("KRONSCOPE_RELIABILITY_KILLS", "1"))


def test_kill9_loses_no_acknowledged_write(
    rel_models_dir: Path, tmp_path: Path, suite_summary: Callable[[SuiteResult], None]
) -> None:
    pg = pg_base_url()
    backend = "postgresql" if pg and pg_reachable(pg) else "sqlite"
    with scratch_database(backend, tmp_path / "db", pg) as db_url:
        result = run_kill9_suite(
            tmp_path / "work", rel_models_dir, db_url, kills=KILLS, writers=4, pause=(1.0, 2.5)
        )
    result.line += f" [{backend}]"
    suite_summary(result)
    assert result.figures.get("acked", 0) > 0
    assert result.ok, result.report(limit=40)
