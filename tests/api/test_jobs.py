"""Jobs: start a harvest (202), poll, cancel, list; the runner's claim/progress/close cycle;
requeue on restart; and a real harvest through upload running to completion."""

from __future__ import annotations

import importlib.util
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from kronscope.app import create_app
from kronscope.db.base import utcnow
from kronscope.db.models import Job
from kronscope.db.repositories import jobs as job_repo
from kronscope.db.repositories import saes as sae_repo
from kronscope.services.jobs import JobContext, JobFailed, JobRunner

from .conftest import make_checkpoint, upload
from .test_app import assert_error


def _cancel_all(factory: sessionmaker[Session], sae_slug: str) -> None:
    with factory() as s:
        sae = sae_repo.get_sae_by_slug(s, sae_slug)
        assert sae is not None
        for status in ("queued", "running"):
            for j in job_repo.list_jobs(s, status=status, sae_id=sae.id, limit=500).items:
                job_repo.cancel_job(s, j.id)
        s.commit()


def test_start_poll_cancel_harvest_job(
    client: TestClient, seeded: Any, auth: dict[str, str], db_factory: sessionmaker[Session]
) -> None:
    _cancel_all(db_factory, seeded.topk)
    r = client.post(
        f"/api/v1/saes/{seeded.topk}/harvests",
        json={"corpus": "builtin", "tokens": 1000, "ctx_len": 16, "examples_per_latent": 5},
        headers=auth,
    )
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert job["status"] == "queued" and job["kind"] == "harvest" and job["sae"] == seeded.topk
    assert job["params"]["tokens"] == 1000 and job["params"]["examples_per_latent"] == 5
    assert job["progress"]["done"] == 0

    # one harvest at a time per SAE
    again = client.post(f"/api/v1/saes/{seeded.topk}/harvests", json={}, headers=auth)
    assert job["id"] in assert_error(again, 409)["message"]

    got = client.get(f"/api/v1/jobs/{job['id']}")
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    listed = client.get("/api/v1/jobs", params={"sae": seeded.topk, "status": "queued"}).json()
    assert job["id"] in [j["id"] for j in listed["items"]]
    assert_error(client.get("/api/v1/jobs", params={"sae": "no-such"}), 404)
    assert_error(client.get("/api/v1/jobs", params={"status": "sleeping"}), 422)

    cancelled = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert_error(client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth), 409)
    assert_error(client.post("/api/v1/jobs/not-a-job/cancel", headers=auth), 404)


def test_harvest_request_validation(client: TestClient, seeded: Any, auth: dict[str, str]) -> None:
    url = f"/api/v1/saes/{seeded.topk}/harvests"
    assert (
        "Unknown corpus"
        in assert_error(client.post(url, json={"corpus": "../../etc"}, headers=auth), 422)[
            "message"
        ]
    )
    assert_error(client.post(url, json={"tokens": 0}, headers=auth), 422)
    assert_error(client.post(url, json={"ctx_len": 1}, headers=auth), 422)
    assert_error(client.post("/api/v1/saes/missing/harvests", json={}, headers=auth), 404)


# -- the runner -----------------------------------------------------------------------------
def _new_job(factory: sessionmaker[Session], kind: str = "import", **params: Any) -> str:
    with factory() as s:
        job = job_repo.create_job(s, kind, params=params, progress_total=100)
        s.commit()
        return job.id


def _job(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = job_repo.get_job(s, job_id)
        assert job is not None
        return job


def _runner(factory: sessionmaker[Session], settings: Any, handler: Any) -> JobRunner:
    return JobRunner(factory, settings, handlers={"import": handler})


def test_runner_completes_and_fails_jobs(db_factory: sessionmaker[Session], settings: Any) -> None:
    def handler(ctx: JobContext) -> str | None:
        if ctx.params.get("fail"):
            raise JobFailed("the corpus is empty")
        if ctx.params.get("crash"):
            raise ZeroDivisionError("division by zero")
        for done in range(0, 101, 25):
            ctx.progress(done, 100, "working")
            time.sleep(0.15)
        return "all done"

    ok, bad, crash = (
        _new_job(db_factory),
        _new_job(db_factory, fail=True),
        _new_job(db_factory, crash=True),
    )
    runner = _runner(db_factory, settings, handler)
    while runner.run_once():
        pass
    done = _job(db_factory, ok)
    assert done.status == "complete" and done.progress_done == 100 and done.message == "all done"
    assert done.finished_at is not None and done.attempts == 1
    failed = _job(db_factory, bad)
    assert failed.status == "failed" and failed.error == "the corpus is empty"
    crashed = _job(db_factory, crash)
    assert crashed.status == "failed" and "ZeroDivisionError" in (crashed.error or "")


def test_runner_reports_progress_and_stops_when_cancelled(
    db_factory: sessionmaker[Session], settings: Any, make_settings: Any
) -> None:
    settings = make_settings(job_heartbeat_seconds=0.1)
    started = threading.Event()
    seen: list[int] = []

    def handler(ctx: JobContext) -> str | None:
        started.set()
        for done in range(1000):
            ctx.progress(done, 1000)
            seen.append(done)
            time.sleep(0.02)
        return None

    job_id = _new_job(db_factory)
    runner = _runner(db_factory, settings, handler)
    thread = threading.Thread(target=runner.run_once)
    thread.start()
    assert started.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = _job(db_factory, job_id)
        if job.progress_done and job.rate:
            break
        time.sleep(0.1)
    assert job.status == "running" and job.progress_done > 0 and job.rate and job.eta_s is not None
    with TestClient(create_app(settings)) as c:
        shown = c.get(f"/api/v1/jobs/{job_id}").json()
        assert shown["status"] == "running" and 0 < shown["progress"]["fraction"] < 1
        assert shown["rate"] > 0 and shown["eta_seconds"] is not None and shown["heartbeat_at"]
    with db_factory() as s:
        job_repo.cancel_job(s, job_id)
        s.commit()
    thread.join(20)
    assert not thread.is_alive()
    assert len(seen) < 1000  # it stopped early
    assert _job(db_factory, job_id).status == "cancelled"


def test_stale_running_job_is_requeued_on_start(
    db_factory: sessionmaker[Session], make_settings: Any
) -> None:
    # An "import" job: the app's runner has no handler for it, so it stays queued where
    # we can see it.
    with db_factory() as s:
        job = job_repo.create_job(s, "import")
        s.commit()
        claimed = job_repo.claim_next(s, "dead-worker", kinds=["import"])
        assert claimed is not None and claimed.id == job.id
        s.execute(
            sa.update(Job)
            .where(Job.id == job.id)
            .values(heartbeat_at=utcnow() - timedelta(minutes=10))
        )
        s.commit()
    settings = make_settings(run_jobs_in_process=True, job_stale_seconds=60)
    with TestClient(create_app(settings)) as c:
        shown = c.get(f"/api/v1/jobs/{job.id}").json()
        assert shown["status"] == "queued" and shown["attempts"] == 1
        assert c.get("/api/v1/health").json()["jobs"] == {"in_process": True, "alive": True}
    # a job that already used all its attempts is failed with the reason instead
    with db_factory() as s:
        s.execute(
            sa.update(Job)
            .where(Job.id == job.id)
            .values(status="running", attempts=3, heartbeat_at=utcnow() - timedelta(minutes=10))
        )
        s.commit()
    with TestClient(create_app(settings)) as c:
        shown = c.get(f"/api/v1/jobs/{job.id}").json()
        assert shown["status"] == "failed" and "stopped responding" in shown["error"]


def test_claim_is_exclusive(db_factory: sessionmaker[Session], settings: Any) -> None:
    ids = [_new_job(db_factory) for _ in range(6)]
    ran: list[str] = []
    lock = threading.Lock()

    def handler(ctx: JobContext) -> str | None:
        with lock:
            ran.append(ctx.job_id)
        time.sleep(0.05)
        return None

    from kronscope.db import make_engine, make_sessionmaker

    runners = [
        JobRunner(
            make_sessionmaker(
                make_engine(str(db_factory.kw["bind"].url.render_as_string(hide_password=False))),
                begin_immediate=True,
            ),
            settings,
            handlers={"import": handler},
        )
        for _ in range(3)
    ]
    threads = [
        threading.Thread(target=lambda r=r: [None for _ in iter(r.run_once, False)])
        for r in runners
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    mine = [j for j in ran if j in ids]
    assert sorted(mine) == sorted(ids)  # each job ran exactly once
    assert all(_job(db_factory, j).status == "complete" for j in ids)


# -- real harvests ----------------------------------------------------------------------------
CORPUS = "\n\n".join(
    [
        "The quick brown fox jumps over the lazy dog.",
        "A sparse autoencoder reads the residual stream of a language model.",
        "KronSAE composes base and extension pre-latents with mAND.",
        "def add(a, b):\n    return a + b",
        "Python lists, tuples and dictionaries are built-in types.",
        "Numbers like 3.14, 42 and 1e-5 appear in text too!",
        "the cat sat on the mat and the dog sat on the log",
    ]
    * 20
)


def _wait_for(client: TestClient, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("complete", "failed", "cancelled"):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not finish: {job}")


_needs_harvest = pytest.mark.skipif(
    importlib.util.find_spec("kronscope.harvest") is None,
    reason="needs the harvest engine (kronscope.harvest), which has not landed yet",
)


@_needs_harvest
def test_harvest_via_upload_runs_to_completion(
    make_settings: Any, auth: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(run_jobs_in_process=True)
    (settings.data_dir / "corpora").mkdir(parents=True)
    (settings.data_dir / "corpora" / "tiny.txt").write_text(CORPUS)
    folder = make_checkpoint(tmp_path / "ck", seed=777001)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = upload(
            c,
            folder,
            auth,
            slug="harvested-upload",
            harvest="true",
            harvest_corpus="tiny.txt",
            harvest_tokens=1024,
            harvest_ctx_len=16,
            harvest_examples=4,
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert (
            body["job"]["status"] in ("queued", "running") and body["harvest_status"] == "pending"
        )
        job = _wait_for(c, body["job"]["id"])
        assert job["status"] == "complete", job
        assert job["progress"]["fraction"] == 1.0 and job["harvest_id"]
        assert job["started_at"] and job["finished_at"] and job["message"]

        sae = c.get("/api/v1/saes/harvested-upload").json()
        assert sae["harvest_status"] == "complete"
        assert sae["active_harvest"]["id"] == job["harvest_id"]
        assert sae["active_harvest"]["corpus"] and sae["active_harvest"]["ctx_len"] == 16
        harvests = c.get("/api/v1/saes/harvested-upload/harvests").json()
        assert harvests["total"] == 1 and harvests["items"][0]["active"]

        latents = c.get("/api/v1/saes/harvested-upload/latents", params={"sort": "density"}).json()
        assert latents["total"] == 16 and latents["harvest_status"] == "complete"
        live = latents["items"][0]
        assert live["density"] > 0
        detail = c.get(f"/api/v1/saes/harvested-upload/latents/{live['index']}").json()
        assert detail["top_examples"], detail
        first = detail["top_examples"][0]
        assert len(first["tokens"]) == len(first["values"]) == 16
        assert all(isinstance(t, str) for t in first["tokens"])
        assert max(first["values"]) > 0
        assert detail["histogram"] is not None
        assert any(g["examples"] for g in detail["sampled_examples"])
        assert detail["composition"]["base_parent"]["stats"] is not None
        assert detail["logit_effects"] is not None  # a causal LM
        assert detail["neighbours"]
        g = detail["composition"]["head"]
        parent = c.get(f"/api/v1/saes/harvested-upload/parents/base/{g}/0").json()
        assert parent["stats"] is not None and len(parent["children"]) == 4
        grid = c.get(f"/api/v1/saes/harvested-upload/heads/{g}").json()
        assert grid["harvest_status"] == "complete"

        # a second harvest through the harvests endpoint
        r = c.post(
            "/api/v1/saes/harvested-upload/harvests",
            json={"corpus": "tiny.txt", "tokens": 512, "ctx_len": 16, "examples_per_latent": 2},
            headers=auth,
        )
        assert r.status_code == 202, r.text
        assert _wait_for(c, r.json()["job"]["id"])["status"] == "complete"
        assert c.get("/api/v1/saes/harvested-upload/harvests").json()["total"] == 2
        assert c.delete("/api/v1/saes/harvested-upload", headers=auth).status_code == 204


@_needs_harvest
def test_failing_harvest_job_reports_the_reason(
    make_settings: Any, auth: dict[str, str], tmp_path: Path
) -> None:
    settings = make_settings(run_jobs_in_process=True)
    (settings.data_dir / "corpora").mkdir(parents=True)
    (settings.data_dir / "corpora" / "empty.txt").write_text("")
    folder = make_checkpoint(tmp_path / "ck", seed=777002)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = upload(
            c, folder, auth, slug="harvest-fails", harvest_corpus="empty.txt", harvest_ctx_len=16
        )
        assert r.status_code == 201, r.text
        job = _wait_for(c, r.json()["job"]["id"])
        assert job["status"] == "failed" and job["error"]
        assert "corpus" in job["error"].lower() or "empty" in job["error"].lower()
        assert c.get("/api/v1/saes/harvest-fails").json()["active_harvest"] is None
        assert c.delete("/api/v1/saes/harvest-fails", headers=auth).status_code == 204


@_needs_harvest
def test_stopped_worker_hands_the_harvest_back_and_it_resumes(
    make_settings: Any, auth: dict[str, str], tmp_path: Path, db_factory: sessionmaker[Session]
) -> None:
    from kronscope.db import make_engine, make_sessionmaker
    from kronscope.db.repositories import harvests as harvest_repo

    settings = make_settings(job_heartbeat_seconds=0.1)
    (settings.data_dir / "corpora").mkdir(parents=True)
    (settings.data_dir / "corpora" / "tiny.txt").write_text(CORPUS * 4)
    folder = make_checkpoint(tmp_path / "ck", seed=777003)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert upload(c, folder, auth, slug="resumed-harvest").status_code == 201
        r = c.post(
            "/api/v1/saes/resumed-harvest/harvests",
            json={"corpus": "tiny.txt", "tokens": 2048, "ctx_len": 16, "batch_size": 1},
            headers=auth,
        )
        job_id = r.json()["job"]["id"]

        engine = make_engine(settings.resolved_database_url)
        runner = JobRunner(make_sessionmaker(engine, begin_immediate=True), settings)
        thread = threading.Thread(target=runner.run_forever)
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = c.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["progress"]["done"] > 0:
                break
            time.sleep(0.05)
        runner.stop(timeout=60)  # a clean shutdown: the job goes back to the queue
        thread.join(60)
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        assert job["status"] == "queued", job
        assert job["attempts"] == 0
        with db_factory() as s:
            sae = sae_repo.get_sae_by_slug(s, "resumed-harvest")
            assert sae is not None
            (first,) = harvest_repo.list_harvests(s, sae.id)
            assert first.status in ("failed", "running")  # unfinished, resumable

        again = JobRunner(make_sessionmaker(engine, begin_immediate=True), settings)
        assert again.run_once()
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        assert job["status"] == "complete", job
        assert job["harvest_id"] == first.id  # the same harvest, resumed
        assert c.get("/api/v1/saes/resumed-harvest/latents").json()["total"] == 16
        engine.dispose()
        assert c.delete("/api/v1/saes/resumed-harvest", headers=auth).status_code == 204
