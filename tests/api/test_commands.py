"""The serve and worker commands: registered with the CLI, and the worker drains the queue."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from kronscope.cli import app
from kronscope.config import get_settings
from kronscope.db.repositories import jobs as job_repo


@pytest.mark.parametrize("command", ["serve", "worker", "keys"])
def test_commands_are_registered(command: str) -> None:
    r = CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0, r.output
    assert command in r.output or "Usage" in r.output


def test_worker_once_runs_queued_jobs(
    make_settings: Any, db_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kronscope.services import jobs as jobs_service

    ran: list[str] = []

    def handler(ctx: jobs_service.JobContext) -> str:
        ran.append(ctx.job_id)
        ctx.progress(1, 1)
        return "ok"

    monkeypatch.setattr(jobs_service, "default_handlers", lambda: {"import": handler})
    settings = make_settings()
    monkeypatch.setenv("KRONSCOPE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("KRONSCOPE_DATA_DIR", str(settings.data_dir))
    with db_factory() as s:
        job = job_repo.create_job(s, "import")
        s.commit()
    get_settings.cache_clear()
    try:
        r = CliRunner().invoke(app, ["worker", "--once"])
    finally:
        get_settings.cache_clear()
    assert r.exit_code == 0, r.output
    assert job.id in ran
    with db_factory() as s:
        done = job_repo.get_job(s, job.id)
        assert done is not None and done.status == "complete" and done.message == "ok"


@pytest.mark.parametrize(
    ("workers", "cores", "preset", "expected"),
    [(2, 2, None, "1"), (2, 8, None, "2"), (4, 2, None, "1"), (2, 2, "3", "3"), (1, 2, None, None)],
)
def test_serve_shares_the_cores_among_workers(
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    cores: int,
    preset: str | None,
    expected: str | None,
) -> None:
    """Several workers each get cores / N page threads (at most the default), unless the
    setting was given; one worker keeps the setting as it is."""
    import os

    import uvicorn

    from kronscope import serving

    seen: dict[str, Any] = {}

    def fake_run(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs, threads=os.environ.get("KRONSCOPE_PAGE_THREADS"))

    def fake_serve(n: int, host: str, port: int, options: dict[str, Any]) -> int:
        seen.update(options, workers=n, threads=os.environ.get("KRONSCOPE_PAGE_THREADS"))
        return 0

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setattr(serving, "serve", fake_serve)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("KRONSCOPE_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    # set first, so that whatever serve writes into the environment is undone afterwards
    monkeypatch.setenv("KRONSCOPE_RUN_JOBS_IN_PROCESS", "false")
    monkeypatch.setenv("KRONSCOPE_PAGE_THREADS", preset or "")
    if preset is None:
        monkeypatch.delenv("KRONSCOPE_PAGE_THREADS")
    r = CliRunner().invoke(app, ["serve", "--workers", str(workers), "--no-jobs"])
    assert r.exit_code == 0, r.output
    assert seen["workers"] == workers
    assert seen["threads"] == expected


def test_serve_refuses_workers_on_sqlite(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not start"))
    monkeypatch.setenv("KRONSCOPE_DATABASE_URL", f"sqlite:///{tmp_path / 'k.db'}")
    r = CliRunner().invoke(app, ["serve", "--workers", "2"])
    assert r.exit_code == 2
    assert "several workers need PostgreSQL" in r.output
