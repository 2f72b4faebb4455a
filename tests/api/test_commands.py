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
