"""Suites 4 and 5 against one live ``kronscope serve`` on a scratch PostgreSQL database:
the database goes away under load (503 fast, recovery without a restart), and 64
concurrent clients on pages and live inference (no errors but the designed 503s, bounded
memory). See ``reliability.live``; the full-size runs are ``benchmarks/reliability.py``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ._support import SuiteResult, scratch_database
from .conftest import PG_RESTART_ENV
from .live import Live, live_server, run_load_suite, run_pg_restart_suite

pytestmark = [pytest.mark.reliability, pytest.mark.postgres, pytest.mark.timeout(600)]

LOAD_SECONDS = float(os.environ.get("KRONSCOPE_RELIABILITY_LOAD_SECONDS", "10"))
LOAD_CLIENTS = int(os.environ.get("KRONSCOPE_RELIABILITY_LOAD_CLIENTS", "64"))


@pytest.fixture(scope="module")
def live(
    rel_pg_url: str, rel_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    work = tmp_path_factory.mktemp("live")
    with (
        scratch_database("postgresql", work, rel_pg_url) as db_url,
        live_server(work, rel_models_dir, db_url) as server,
    ):
        yield server


def test_database_outage_answers_503_fast_and_recovers(
    live: Live, suite_summary: Callable[[SuiteResult], None]
) -> None:
    result = run_pg_restart_suite(live, duration=8.0, clients=8, disruptions=2)
    suite_summary(result)
    assert result.figures["disruptions"] == 2
    assert result.ok, result.report(limit=30)


@pytest.mark.skipif(
    os.environ.get(PG_RESTART_ENV) != "1",
    reason=f"restarts the shared PostgreSQL cluster: set {PG_RESTART_ENV}=1",
)
def test_postgres_restart_answers_503_fast_and_recovers(
    live: Live, suite_summary: Callable[[SuiteResult], None]
) -> None:
    result = run_pg_restart_suite(live, duration=12.0, clients=8, disruptions=1, real_restart=True)
    suite_summary(result)
    assert result.ok, result.report(limit=30)


def test_many_clients_on_pages_and_inference(
    live: Live, suite_summary: Callable[[SuiteResult], None]
) -> None:
    result = run_load_suite(live, clients=LOAD_CLIENTS, duration=LOAD_SECONDS)
    suite_summary(result)
    assert result.figures["requests"] > 0
    assert result.ok, result.report(limit=30)
