"""The job queue: lifecycle, cancellation, stale workers, and one winner per job."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from kronscope.db.base import utcnow
from kronscope.db.models import Job
from kronscope.db.repositories import jobs


def test_lifecycle(db_scratch_session: Session) -> None:
    job = jobs.create_job(
        db_scratch_session, "harvest", params={"tokens": 1000}, progress_total=1000
    )
    assert job.status == "queued" and len(job.id) == 36
    assert jobs.claim_next(db_scratch_session, "w1", kinds=["explain"]) is None
    claimed = jobs.claim_next(db_scratch_session, "w1")
    assert claimed is not None and claimed.id == job.id
    assert claimed.status == "running" and claimed.locked_by == "w1" and claimed.attempts == 1
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    assert jobs.claim_next(db_scratch_session, "w2") is None

    assert jobs.update_progress(
        db_scratch_session, job.id, worker_id="w1", done=500, rate=50.0, eta_s=10.0
    )
    assert job.progress_done == 500 and job.rate == 50.0
    assert not jobs.update_progress(db_scratch_session, job.id, worker_id="someone-else", done=600)
    assert jobs.finish_job(db_scratch_session, job.id, worker_id="w1", message="done")
    assert job.status == "complete" and job.progress_done == 1000 and job.finished_at is not None
    assert not jobs.fail_job(db_scratch_session, job.id, "too late")
    assert not jobs.cancel_job(db_scratch_session, job.id)
    assert jobs.list_jobs(db_scratch_session, status="complete").total >= 1


def test_oldest_first_fail_and_cancel(db_scratch_session: Session) -> None:
    a = jobs.create_job(db_scratch_session, "import")
    b = jobs.create_job(db_scratch_session, "explain")
    db_scratch_session.execute(
        sa.update(Job).where(Job.id == b.id).values(created_at=utcnow() - timedelta(hours=1))
    )
    assert jobs.claim_next(db_scratch_session, "w").id == b.id  # type: ignore[union-attr]
    assert jobs.fail_job(db_scratch_session, b.id, "boom")
    assert jobs.get_job(db_scratch_session, b.id).error == "boom"  # type: ignore[union-attr]

    assert jobs.cancel_job(db_scratch_session, a.id)  # queued -> cancelled: never claimed
    assert jobs.claim_next(db_scratch_session, "w") is None

    c = jobs.create_job(db_scratch_session, "harvest")
    jobs.claim_next(db_scratch_session, "w")
    assert jobs.cancel_job(db_scratch_session, c.id)  # running -> cancelled; the worker learns:
    assert not jobs.update_progress(db_scratch_session, c.id, worker_id="w", done=1)
    assert c.status == "cancelled"
    with pytest.raises(ValueError):
        jobs.create_job(db_scratch_session, "mine bitcoin")


def test_release_gives_the_job_back(db_scratch_session: Session) -> None:
    job = jobs.create_job(db_scratch_session, "harvest")
    jobs.claim_next(db_scratch_session, "w1")
    assert not jobs.release_job(db_scratch_session, job.id, "w2")
    assert jobs.release_job(db_scratch_session, job.id, "w1")
    assert job.status == "queued" and job.locked_by is None and job.attempts == 0
    assert jobs.claim_next(db_scratch_session, "w2").attempts == 1  # type: ignore[union-attr]


def test_requeue_stale(db_scratch_session: Session) -> None:
    job = jobs.create_job(db_scratch_session, "harvest")
    jobs.claim_next(db_scratch_session, "dead-worker")
    assert jobs.requeue_stale(db_scratch_session, stale_after_s=60) == []
    db_scratch_session.execute(
        sa.update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(minutes=5))
    )
    assert jobs.requeue_stale(db_scratch_session, stale_after_s=60) == [job.id]
    assert job.status == "queued" and job.locked_by is None
    assert not jobs.update_progress(db_scratch_session, job.id, worker_id="dead-worker", done=1)

    again = jobs.claim_next(db_scratch_session, "w2")
    assert again is not None and again.attempts == 2
    db_scratch_session.execute(
        sa.update(Job)
        .where(Job.id == job.id)
        .values(heartbeat_at=utcnow() - timedelta(minutes=5), attempts=3)
    )
    assert jobs.requeue_stale(db_scratch_session, stale_after_s=60, max_attempts=3) == []
    assert job.status == "failed" and "stopped responding" in (job.error or "")


@pytest.mark.timeout(60)
def test_concurrent_workers_claim_each_job_once(db_committed: sessionmaker[Session]) -> None:
    with db_committed() as session:
        ids = {jobs.create_job(session, "harvest").id for _ in range(12)}
        session.commit()

    n_workers = 4
    barrier = threading.Barrier(n_workers)
    claimed: dict[str, list[str]] = {f"w{i}": [] for i in range(n_workers)}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            barrier.wait()
            while True:
                with db_committed() as session:
                    job = jobs.claim_next(session, name)
                    session.commit()
                if job is None:
                    return
                claimed[name].append(job.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    everything = [j for got in claimed.values() for j in got]
    assert sorted(everything) == sorted(ids)  # each job once, none lost
    with db_committed() as session:
        rows = session.scalars(sa.select(Job)).all()
        assert {j.status for j in rows} == {"running"} and {j.attempts for j in rows} == {1}
        assert {j.id: j.locked_by for j in rows} == {
            jid: name for name, got in claimed.items() for jid in got
        }


@pytest.mark.timeout(60)
def test_two_workers_one_job_exactly_one_wins(db_committed: sessionmaker[Session]) -> None:
    def work(name: str, barrier: threading.Barrier, results: dict[str, str | None]) -> None:
        barrier.wait()
        with db_committed() as session:
            job = jobs.claim_next(session, name)
            session.commit()
        results[name] = job.id if job else None

    for _ in range(5):
        with db_committed() as session:
            job_id = jobs.create_job(session, "explain").id
            session.commit()
        barrier = threading.Barrier(2)
        results: dict[str, str | None] = {}
        threads = [threading.Thread(target=work, args=(n, barrier, results)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values(), key=str) == sorted([job_id, None], key=str)
        with db_committed() as session:
            session.execute(sa.delete(Job))
            session.commit()


@pytest.mark.timeout(60)
def test_skip_locked_does_not_wait_for_a_held_job(db_committed: sessionmaker[Session]) -> None:
    """PostgreSQL: while one worker's transaction holds the oldest job, another takes the next."""
    with db_committed() as session:
        if session.get_bind().dialect.name != "postgresql":
            pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite serialises writers instead")
        first = jobs.create_job(session, "harvest")
        session.execute(
            sa.update(Job)
            .where(Job.id == first.id)
            .values(created_at=utcnow() - timedelta(hours=1))
        )
        second = jobs.create_job(session, "harvest")
        session.commit()
    holder = db_committed()
    try:
        got = jobs.claim_next(holder, "holder")  # transaction left open: row stays locked
        assert got is not None and got.id == first.id
        with db_committed() as other:
            other.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            taken = jobs.claim_next(other, "other")
            other.commit()
        assert taken is not None and taken.id == second.id
    finally:
        holder.rollback()
        holder.close()
