"""Fixtures of the reliability suite (``-m reliability``).

- ``rel_models_dir``: a models folder with ``tiny-gpt2`` only (quicker than all three).
- ``rel_pg_url``: the PostgreSQL server of ``KRONSCOPE_TEST_POSTGRES_URL``; tests that need
  it are skipped without it.
- ``suite_summary``: records a suite's one summary line; every line recorded is printed
  again at the end of the run ("reliability summaries").

``KRONSCOPE_RELIABILITY_PG_RESTART=1`` also runs the test that restarts the whole local
PostgreSQL cluster (it interrupts every other user of that server briefly: CI sets it at
the end of a run, never the default suite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ._support import SuiteResult, ensure_models_dir, pg_base_url, pg_reachable

PG_RESTART_ENV = "KRONSCOPE_RELIABILITY_PG_RESTART"
_LINES: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: the reliability suite (tests/reliability; minutes, live servers)"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LINES:
        terminalreporter.section("reliability summaries")
        for line in _LINES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def rel_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_models_dir(tmp_path_factory.mktemp("rel-models"))


@pytest.fixture(scope="session")
def rel_pg_url() -> str:
    url = pg_base_url()
    if not url:
        pytest.skip("KRONSCOPE_TEST_POSTGRES_URL is not set: no PostgreSQL server to test against")
    if not pg_reachable(url):
        pytest.skip("the PostgreSQL server of KRONSCOPE_TEST_POSTGRES_URL is not reachable")
    return url


@pytest.fixture
def suite_summary() -> Iterator[Callable[[SuiteResult], None]]:
    """``suite_summary(result)``: print the suite's report now and its line at the end."""

    def record(result: SuiteResult) -> None:
        _LINES.append(result.line)
        print(result.report())

    yield record
