"""Jobs: long work (harvest, later explain and import) run outside the request.

One ``JobRunner`` loop serves both deployments: a daemon thread of the web process (the
embedded default, started in the app's lifespan) or the ``kronscope worker`` process
(PostgreSQL deployments; several may run, the repository's ``claim_next`` gives each job to
exactly one of them).

- **Claim, run, close.** The loop requeues stale jobs, claims the oldest queued one and
  runs its kind's handler, then marks it complete or failed (with the reason).
- **Heartbeat.** While a handler runs, a second thread records progress and a heartbeat
  every ``job_heartbeat_seconds``, so even a long model load keeps the job alive. When the
  repository says the job is no longer ours (cancelled, or requeued after a missed
  heartbeat), the handler is told at its next progress report and stops.
- **Restarts.** Jobs whose worker died keep ``running`` with an old heartbeat; every loop
  (and the start) hands them back to the queue, or fails them after ``job_max_attempts``.
  A requeued harvest resumes from the state it saved.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ..config import Settings
from ..db.models import Job, JobStatus
from ..db.repositories import jobs as job_repo
from . import tx

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside a handler (from ``progress``) once the job is cancelled or taken away."""


class JobFailed(Exception):
    """A handler's way to fail its job with a plain-words reason (no traceback kept)."""


@dataclass
class JobContext:
    """What a handler gets: the job's facts, sessions, settings and a progress reporter."""

    job_id: str
    kind: str
    params: dict[str, Any]
    sae_id: int | None
    harvest_id: int | None
    attempts: int
    settings: Settings
    session_factory: sessionmaker[Session]
    worker_id: str
    _state: _Progress = field(repr=False, default=None)  # type: ignore[assignment]

    def progress(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Report progress; raises ``JobCancelled`` once the job should stop."""
        self._state.update(done, total, message)
        if self._state.stop.is_set():
            raise JobCancelled(self._state.stop_reason or "the job was cancelled")

    @property
    def done(self) -> int:
        """The progress reported so far."""
        return self._state.done

    @property
    def cancelled(self) -> bool:
        return self._state.stop.is_set()

    def set_harvest(self, harvest_id: int) -> None:
        """Record the harvest this job writes (shown with the job, used to resume)."""
        self.harvest_id = harvest_id
        with self.session_factory() as s:
            job = job_repo.get_job(s, self.job_id)
            if job is not None:
                job.harvest_id = harvest_id
            tx.commit(s)


Handler = Callable[[JobContext], str | None]
"""Runs one job; returns an optional closing message. Raise to fail it."""


class _Progress:
    """Progress shared between the handler's thread and the heartbeat thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.total: int | None = None
        self.message: str | None = None
        self.started = time.monotonic()
        self.first_done: int | None = None
        self.stop = threading.Event()
        self.stop_reason: str | None = None

    def update(self, done: int, total: int | None, message: str | None) -> None:
        with self.lock:
            if self.first_done is None:
                self.first_done = int(done)
                self.started = time.monotonic()
            self.done = int(done)
            if total is not None:
                self.total = int(total)
            if message is not None:
                self.message = message

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            elapsed = time.monotonic() - self.started
            gained = self.done - (self.first_done or 0)
            rate = gained / elapsed if elapsed > 0.5 and gained > 0 else None
            eta = None
            if rate and self.total is not None:
                eta = max(self.total - self.done, 0) / rate
            return {
                "done": self.done,
                "total": self.total,
                "rate": rate,
                "eta_s": eta,
                "message": self.message,
            }


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def default_handlers() -> dict[str, Handler]:
    from .explanations import run_explain_job
    from .harvest_jobs import run_harvest_job

    return {"harvest": run_harvest_job, "explain": run_explain_job}


class JobRunner:
    """Claims and runs jobs until stopped. ``start()`` runs it in a daemon thread."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        settings: Settings,
        *,
        handlers: dict[str, Handler] | None = None,
        worker_id: str | None = None,
    ):
        self.session_factory = session_factory
        self.settings = settings
        self.handlers = handlers if handlers is not None else default_handlers()
        self.worker_id = worker_id or default_worker_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: _Progress | None = None
        self._last_requeue = 0.0

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name="kronscope-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop (and a running job) to stop; a stopped job is requeued for later."""
        self._stop.set()
        current = self._current
        if current is not None:
            current.stop_reason = "the worker is shutting down"
            current.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_forever(self) -> None:
        log.info("job runner %s started", self.worker_id)
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the database may be down: keep the loop alive and retry
                log.warning("job runner: could not look for work", exc_info=True)
                ran = False
            if not ran:
                self._stop.wait(self.settings.job_poll_seconds)
        log.info("job runner %s stopped", self.worker_id)

    # -- one step ----------------------------------------------------------------------
    def requeue_stale(self) -> list[str]:
        with self.session_factory() as s:
            ids = job_repo.requeue_stale(
                s,
                stale_after_s=self.settings.job_stale_seconds,
                max_attempts=self.settings.job_max_attempts,
            )
            tx.commit(s)
        if ids:
            log.info("requeued jobs of dead workers: %s", ", ".join(ids))
        self._last_requeue = time.monotonic()
        return ids

    def claim(self) -> Job | None:
        with self.session_factory() as s:
            job = job_repo.claim_next(s, self.worker_id, kinds=sorted(self.handlers))
            tx.commit(s)
        return job

    def run_once(self) -> bool:
        """Requeue stale jobs (at most every few seconds), claim one and run it."""
        if time.monotonic() - self._last_requeue > min(self.settings.job_stale_seconds / 2, 30.0):
            self.requeue_stale()
        job = self.claim()
        if job is None:
            return False
        self.run_job(job)
        return True

    def run_job(self, job: Job) -> None:
        progress = _Progress()
        progress.done = int(job.progress_done or 0)
        progress.total = job.progress_total
        ctx = JobContext(
            job_id=job.id,
            kind=job.kind,
            params=dict(job.params or {}),
            sae_id=job.sae_id,
            harvest_id=job.harvest_id,
            attempts=job.attempts,
            settings=self.settings,
            session_factory=self.session_factory,
            worker_id=self.worker_id,
            _state=progress,
        )
        self._current = progress
        beat_stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat,
            args=(job.id, progress, beat_stop),
            name=f"job-heartbeat-{job.id[:8]}",
            daemon=True,
        )
        beat.start()
        log.info("job %s (%s) started by %s", job.id, job.kind, self.worker_id)
        outcome: tuple[str, str | None]
        try:
            handler = self.handlers[job.kind]
            outcome = ("complete", handler(ctx))
        except JobCancelled as exc:
            outcome = ("stopped", str(exc))
        except JobFailed as exc:
            outcome = ("failed", str(exc))
        except Exception as exc:  # a bug or an environment problem: keep the reason
            log.exception("job %s failed", job.id)
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            outcome = ("failed", last)
        finally:
            beat_stop.set()
            beat.join(5.0)
            self._current = None
        self._close(job.id, progress, outcome)

    def _close(self, job_id: str, progress: _Progress, outcome: tuple[str, str | None]) -> None:
        kind, text = outcome
        for attempt in range(5):  # the database may be briefly busy or down
            try:
                with self.session_factory() as s:
                    snap = progress.snapshot()
                    job_repo.update_progress(
                        s, job_id, worker_id=self.worker_id, done=snap["done"], total=snap["total"]
                    )
                    if kind == "complete":
                        job_repo.finish_job(s, job_id, worker_id=self.worker_id, message=text)
                    elif kind == "failed":
                        job_repo.fail_job(s, job_id, text or "failed", worker_id=self.worker_id)
                    elif (
                        self._stop.is_set()
                        and progress.stop_reason == "the worker is shutting down"
                    ):
                        # Shutting down: hand the job back so it resumes on the next start.
                        release_job(s, job_id, self.worker_id)
                    tx.commit(s)
                log.info("job %s: %s%s", job_id, kind, f" ({text})" if text else "")
                return
            except Exception:
                log.warning(
                    "job %s: could not record its end (try %d)", job_id, attempt + 1, exc_info=True
                )
                time.sleep(min(2.0**attempt, 10.0))

    def _heartbeat(self, job_id: str, progress: _Progress, stop: threading.Event) -> None:
        interval = self.settings.job_heartbeat_seconds
        while not stop.wait(interval):
            try:
                snap = progress.snapshot()
                with self.session_factory() as s:
                    ours = job_repo.update_progress(
                        s,
                        job_id,
                        worker_id=self.worker_id,
                        done=snap["done"],
                        total=snap["total"],
                        rate=snap["rate"],
                        eta_s=snap["eta_s"],
                        message=snap["message"],
                    )
                    status = job_repo.get_job(s, job_id)
                    tx.commit(s)
                if not ours:
                    cancelled = status is not None and status.status == JobStatus.CANCELLED
                    progress.stop_reason = (
                        "the job was cancelled"
                        if cancelled
                        else "the job was taken over by another worker"
                    )
                    progress.stop.set()
                    return
            except Exception:
                log.warning("job %s: heartbeat failed; retrying", job_id, exc_info=True)


def release_job(session: Session, job_id: str, worker_id: str) -> None:
    """Running (ours) -> queued, for a worker shutting down cleanly (the attempt it used is
    given back). Not in ``db.repositories.jobs`` yet; it belongs there."""
    import sqlalchemy as sa

    from ..db.base import utcnow

    session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.locked_by == worker_id)
        .values(
            status=JobStatus.QUEUED.value,
            locked_by=None,
            locked_at=None,
            attempts=sa.case((Job.attempts > 0, Job.attempts - 1), else_=0),
            updated_at=utcnow(),
        )
    )


# -- what the API needs -------------------------------------------------------------------------
def job_dict(session: Session, job: Job) -> dict[str, Any]:
    from ..db.repositories import saes as sae_repo

    sae = sae_repo.get_sae(session, job.sae_id) if job.sae_id is not None else None
    done, total = int(job.progress_done or 0), job.progress_total
    fraction = None
    if total:
        fraction = max(0.0, min(1.0, done / total))
    elif job.status == JobStatus.COMPLETE:
        fraction = 1.0
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "sae": sae.slug if sae else None,
        "harvest_id": job.harvest_id,
        "params": job.params or {},
        "progress": {"done": done, "total": total, "fraction": fraction},
        "rate": job.rate,
        "eta_seconds": job.eta_s,
        "message": job.message,
        "error": job.error,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "heartbeat_at": job.heartbeat_at,
    }
