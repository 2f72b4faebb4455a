"""The job queue: long work (harvest, explain, import) claimed by workers.

``claim_next`` is one statement, ``UPDATE job ... WHERE id = (SELECT ... LIMIT 1) AND
status = 'queued' RETURNING id``: on PostgreSQL the sub-select is ``FOR UPDATE SKIP
LOCKED``, so concurrent workers take different jobs without waiting; on SQLite the write
lock serialises the statements and the status re-check makes the loser claim nothing. On
SQLite call it at the start of a transaction (a worker's own session; see
``make_sessionmaker(begin_immediate=True)``). A worker reports progress with
``update_progress``, which returns False once the job is cancelled or taken from it;
``requeue_stale`` hands jobs of dead workers (no heartbeat) back to the queue.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..base import utcnow
from ..models import Job, JobKind, JobStatus
from ._common import Page

_job = cast(sa.Table, Job.__table__)
_FINAL = (JobStatus.COMPLETE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)


def create_job(
    session: Session,
    kind: str,
    *,
    params: dict[str, Any] | None = None,
    sae_id: int | None = None,
    harvest_id: int | None = None,
    progress_total: int | None = None,
) -> Job:
    job = Job(
        id=str(uuid.uuid4()),
        kind=JobKind(kind).value,
        status=JobStatus.QUEUED.value,
        sae_id=sae_id,
        harvest_id=harvest_id,
        params=params or {},
        progress_done=0,
        progress_total=progress_total,
        attempts=0,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def _reload(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    sae_id: int | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page[Job]:
    where: list[Any] = []
    if status is not None:
        where.append(Job.status == JobStatus(status).value)
    if sae_id is not None:
        where.append(Job.sae_id == sae_id)
    items = list(
        session.scalars(
            sa.select(Job)
            .where(*where)
            .order_by(Job.created_at.desc(), Job.id)
            .limit(limit)
            .offset(offset)
        )
    )
    total = session.scalar(sa.select(sa.func.count()).select_from(Job).where(*where)) or 0
    return Page(items, total)


def claim_next(session: Session, worker_id: str, *, kinds: list[str] | None = None) -> Job | None:
    """Take the oldest queued job (of ``kinds``) for ``worker_id``; None when none is free."""
    pick = sa.select(_job.c.id).where(_job.c.status == JobStatus.QUEUED.value)
    if kinds:
        pick = pick.where(_job.c.kind.in_([JobKind(k).value for k in kinds]))
    pick = pick.order_by(_job.c.created_at, _job.c.id).limit(1).with_for_update(skip_locked=True)
    now = utcnow()
    job_id = session.execute(
        sa.update(_job)
        .where(_job.c.id == pick.scalar_subquery(), _job.c.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            locked_by=worker_id,
            locked_at=now,
            heartbeat_at=now,
            started_at=sa.func.coalesce(_job.c.started_at, now),
            attempts=_job.c.attempts + 1,
            updated_at=now,
        )
        .returning(_job.c.id)
    ).scalar_one_or_none()
    return None if job_id is None else _reload(session, job_id)


def update_progress(
    session: Session,
    job_id: str,
    *,
    worker_id: str | None = None,
    done: int | None = None,
    total: int | None = None,
    rate: float | None = None,
    eta_s: float | None = None,
    message: str | None = None,
) -> bool:
    """Record progress and a heartbeat. False: the job is no longer running for this
    worker (cancelled, or requeued after a missed heartbeat): stop working on it."""
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
    for name, value in (
        ("progress_done", done),
        ("progress_total", total),
        ("rate", rate),
        ("eta_s", eta_s),
        ("message", message),
    ):
        if value is not None:
            values[name] = value
    stmt = sa.update(_job).where(_job.c.id == job_id, _job.c.status == JobStatus.RUNNING.value)
    if worker_id is not None:
        stmt = stmt.where(_job.c.locked_by == worker_id)
    changed = session.execute(stmt.values(**values)).rowcount == 1  # type: ignore[attr-defined]
    _reload(session, job_id)
    return changed


def _close(session: Session, job_id: str, worker_id: str | None, **values: Any) -> bool:
    now = utcnow()
    stmt = sa.update(_job).where(_job.c.id == job_id, _job.c.status == JobStatus.RUNNING.value)
    if worker_id is not None:
        stmt = stmt.where(_job.c.locked_by == worker_id)
    changed = (
        session.execute(
            stmt.values(finished_at=now, updated_at=now, heartbeat_at=now, **values)
        ).rowcount  # type: ignore[attr-defined]
        == 1
    )
    _reload(session, job_id)
    return changed


def finish_job(
    session: Session, job_id: str, *, worker_id: str | None = None, message: str | None = None
) -> bool:
    """Running -> complete (progress set to its total). False if it was not running."""
    values: dict[str, Any] = {
        "status": JobStatus.COMPLETE.value,
        "progress_done": sa.func.coalesce(_job.c.progress_total, _job.c.progress_done),
        "eta_s": 0.0,
    }
    if message is not None:
        values["message"] = message
    return _close(session, job_id, worker_id, **values)


def fail_job(session: Session, job_id: str, error: str, *, worker_id: str | None = None) -> bool:
    return _close(session, job_id, worker_id, status=JobStatus.FAILED.value, error=error)


def cancel_job(session: Session, job_id: str) -> bool:
    """Queued or running -> cancelled (a running worker sees it at its next progress call)."""
    now = utcnow()
    changed = (
        session.execute(
            sa.update(_job)
            .where(_job.c.id == job_id, _job.c.status.not_in(_FINAL))
            .values(status=JobStatus.CANCELLED.value, finished_at=now, updated_at=now)
        ).rowcount  # type: ignore[attr-defined]
        == 1
    )
    _reload(session, job_id)
    return changed


def release_job(session: Session, job_id: str, worker_id: str) -> bool:
    """Running (ours) -> queued, for a worker shutting down cleanly; the attempt it used is
    given back. False if the job was not running for ``worker_id``."""
    changed = (
        session.execute(
            sa.update(_job)
            .where(
                _job.c.id == job_id,
                _job.c.status == JobStatus.RUNNING.value,
                _job.c.locked_by == worker_id,
            )
            .values(
                status=JobStatus.QUEUED.value,
                locked_by=None,
                locked_at=None,
                attempts=sa.case((_job.c.attempts > 0, _job.c.attempts - 1), else_=0),
                updated_at=utcnow(),
            )
        ).rowcount  # type: ignore[attr-defined]
        == 1
    )
    _reload(session, job_id)
    return changed


def requeue_stale(session: Session, *, stale_after_s: float, max_attempts: int = 3) -> list[str]:
    """Running jobs whose heartbeat is older than ``stale_after_s``: back to the queue, or
    failed once they have been tried ``max_attempts`` times. Returns the requeued ids."""
    now = utcnow()
    stale = sa.and_(
        _job.c.status == JobStatus.RUNNING.value,
        _job.c.heartbeat_at < now - timedelta(seconds=stale_after_s),
    )
    session.execute(
        sa.update(_job)
        .where(stale, _job.c.attempts >= max_attempts)
        .values(
            status=JobStatus.FAILED.value,
            error="the worker stopped responding too many times",
            finished_at=now,
            updated_at=now,
            locked_by=None,
        )
    )
    requeued = list(
        session.execute(
            sa.update(_job)
            .where(stale)
            .values(status=JobStatus.QUEUED.value, locked_by=None, locked_at=None, updated_at=now)
            .returning(_job.c.id)
        ).scalars()
    )
    session.expire_all()
    return requeued
