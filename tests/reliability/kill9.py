"""Suite 3: ``kill -9`` of the worker during a harvest and of the server during a stream of
explanation edits.

- **Worker.** ``kronscope serve --no-jobs`` and one ``kronscope worker`` share a database;
  a harvest is queued through the API; while the job runs the worker gets SIGKILL. Until
  the job ends again no partial harvest may be visible (no latents, no complete harvest).
  A new worker is started: the job must resume and complete (its harvest then visible,
  whole) or fail with a reason (nothing visible).
- **Server.** Writer threads create and edit explanations through the API with a key made
  by ``kronscope keys create``; the server gets SIGKILL at random moments and is started
  again. Every write that got a 2xx must be there afterwards: each acknowledged text in
  the explanation's history, in order, and the current text the last one written (an
  unacknowledged write may or may not have landed, never anything else).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ._support import (
    Process,
    Server,
    SuiteResult,
    create_key,
    folder_parts,
    kronscope_env,
    make_checkpoint,
)

SLUG = "k9-kron"
TERMINAL = ("complete", "failed", "cancelled")


@dataclass
class Track:
    """One explanation's writes, in the order one writer sent them."""

    latent: int
    attempted: list[str] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    tracks: dict[int, Track] = field(default_factory=dict)
    orphan_creates: list[str] = field(default_factory=list)
    acked: int = 0
    attempts: int = 0
    no_response: int = 0
    unavailable: int = 0
    problems: list[str] = field(default_factory=list)


def _writer(
    wid: int, base_url: str, key: str, latent: int, stop: threading.Event, ledger: Ledger, seed: int
) -> None:
    rng = random.Random(seed * 1000 + wid)
    headers = {"Authorization": f"Bearer {key}"}
    mine: list[int] = []
    n = 0
    path = f"/api/v1/saes/{SLUG}/latents/{latent}/explanations"
    with httpx.Client(base_url=base_url, timeout=20.0, headers=headers) as client:
        while not stop.is_set():
            n += 1
            text = f"writer {wid} write {n} {rng.random():.6f}"
            create = len(mine) < 2 or rng.random() < 0.15
            target = None if create else rng.choice(mine)
            if target is not None:
                with ledger.lock:
                    ledger.tracks[target].attempted.append(text)
            with ledger.lock:
                ledger.attempts += 1
            try:
                if create:
                    r = client.post(path, json={"text": text})
                else:
                    r = client.put(f"{path}/{target}", json={"text": text})
            except httpx.HTTPError:
                with ledger.lock:
                    ledger.no_response += 1
                    if create:
                        ledger.orphan_creates.append(text)
                time.sleep(0.2)
                continue
            ok = r.status_code in (200, 201)
            with ledger.lock:
                if ok and create:
                    eid = int(r.json()["id"])
                    ledger.tracks[eid] = Track(latent, [text], [text])
                    mine.append(eid)
                    ledger.acked += 1
                elif ok:
                    assert target is not None
                    ledger.tracks[target].acked.append(text)
                    ledger.acked += 1
                elif r.status_code == 503:
                    ledger.unavailable += 1  # starting up, or the database is away: retry
                    if create:
                        ledger.orphan_creates.append(text)
                else:
                    ledger.problems.append(
                        f"writer {wid}: {'POST' if create else 'PUT'} got {r.status_code}: {r.text[:200]}"
                    )
                    if create:
                        ledger.orphan_creates.append(text)
            if not ok:
                time.sleep(0.2)


def _is_subsequence(needles: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(x == y for y in it) for x in needles)


def _verify_edits(client: httpx.Client, ledger: Ledger) -> tuple[int, list[str]]:
    """(acknowledged writes missing, problems)."""
    lost = 0
    problems: list[str] = []
    for eid, track in sorted(ledger.tracks.items()):
        r = client.get(f"/api/v1/saes/{SLUG}/latents/{track.latent}/explanations/{eid}")
        if r.status_code != 200:
            lost += len(track.acked)
            problems.append(f"explanation {eid}: GET {r.status_code} {r.text[:200]}")
            continue
        body = r.json()
        history = [h["text"] for h in body.get("history", [])]
        missing = [t for t in track.acked if t not in history]
        lost += len(missing)
        if missing:
            problems.append(f"explanation {eid}: acknowledged writes lost: {missing[:3]}")
        elif not _is_subsequence(track.acked, history):
            problems.append(f"explanation {eid}: history out of order: {history[-5:]}")
        foreign = [t for t in history if t not in track.attempted]
        if foreign:
            problems.append(f"explanation {eid}: texts nobody wrote: {foreign[:3]}")
        if history and body.get("text") != history[-1]:
            problems.append(f"explanation {eid}: text {body.get('text')!r} is not its last version")
        if track.acked and track.acked[-1] in history:
            tail = history[history.index(track.acked[-1]) + 1 :]
            later = track.attempted[track.attempted.index(track.acked[-1]) + 1 :]
            if any(t not in later for t in tail):
                problems.append(
                    f"explanation {eid}: versions after the last acknowledged one: {tail[:3]}"
                )
    return lost, problems


def _wait_job(
    client: httpx.Client, job: str, until: float, want: tuple[str, ...]
) -> dict[str, Any]:
    last: dict[str, Any] = {}
    while time.monotonic() < until:
        try:
            r = client.get(f"/api/v1/jobs/{job}")
            if r.status_code == 200:
                last = r.json()
                if last["status"] in want or last["status"] in TERMINAL:
                    return last
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return last


def _visible(client: httpx.Client) -> tuple[str, int, list[dict[str, Any]]]:
    """(harvest_status, latents listed, harvests) as a page would see them."""
    sae = client.get(f"/api/v1/saes/{SLUG}").json()
    latents = client.get(f"/api/v1/saes/{SLUG}/latents", params={"limit": 500}).json()
    harvests = client.get(f"/api/v1/saes/{SLUG}/harvests").json().get("items", [])
    return sae.get("harvest_status", "?"), int(latents.get("total", 0)), harvests


def harvest_part(
    server: Server, env: dict[str, str], key: str, work: Path, result: SuiteResult, *,
    tokens: int, timeout: float, rng: random.Random,
) -> str:  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    worker = Process(["worker"], env, work / "worker.log")
    outcome = "not run"
    with httpx.Client(base_url=server.base_url, timeout=30.0, headers=headers) as client:
        r = client.post(
            f"/api/v1/saes/{SLUG}/harvests",
            json={
                "corpus": "builtin",
                "tokens": tokens,
                "ctx_len": 32,
                "examples_per_latent": 5,
                "samples_per_latent": 5,
                # one context a step: the pass lasts long enough to be killed in the middle
                "batch_size": 1,
            },
        )
        if r.status_code != 202:
            result.problems.append(f"harvest: could not start: {r.status_code} {r.text[:200]}")
            return "not started"
        job_id = r.json()["job"]["id"]
        deadline = time.monotonic() + timeout
        try:
            worker.start()
            job = _wait_job(client, job_id, deadline, ("running",))
            if job.get("status") == "running":
                # Let it reach a random point of the pass, then kill it there.
                aim = rng.uniform(0.05, 0.5)
                t_run = time.monotonic()
                while time.monotonic() - t_run < 120 and job.get("status") == "running":
                    done, total = job["progress"]["done"], job["progress"]["total"]
                    if done and total and done >= aim * total:
                        break
                    time.sleep(0.1)
                    job = client.get(f"/api/v1/jobs/{job_id}").json()
                worker.kill9()
                job = client.get(f"/api/v1/jobs/{job_id}").json()
                status, n_latents, harvests = _visible(client)
                complete = [h for h in harvests if h.get("status") == "complete"]
                if job["status"] == "running":
                    if n_latents or complete or status == "complete":
                        result.problems.append(
                            f"harvest: partial harvest visible after kill -9: status {status}, "
                            f"{n_latents} latents, harvests {harvests}"
                        )
                    killed_at = job["progress"]["done"]
                    worker.start()
                    job = _wait_job(client, job_id, deadline, TERMINAL)
                    status, n_latents, harvests = _visible(client)
                    if job.get("status") == "complete":
                        if status != "complete" or n_latents == 0:
                            result.problems.append(
                                f"harvest: resumed job complete but pages show {status}, {n_latents} latents"
                            )
                        outcome = f"resumed (killed at {killed_at} tokens, attempts {job.get('attempts')})"
                    elif job.get("status") == "failed":
                        if not (job.get("error") or "").strip():
                            result.problems.append("harvest: failed without a reason")
                        if n_latents or status == "complete":
                            result.problems.append(
                                f"harvest: failed job left pages: {status}, {n_latents} latents"
                            )
                        outcome = f"failed cleanly ({(job.get('error') or '')[:80]})"
                    else:
                        result.problems.append(
                            f"harvest: not finished {timeout:.0f} s after the restart: {job}"
                        )
                        outcome = "stuck"
                # else: it ended before the kill; judged below like a job that never ran long
            if job.get("status") in ("failed", "cancelled") and outcome == "not run":
                status, n_latents, _ = _visible(client)
                if n_latents or status == "complete":
                    result.problems.append(
                        f"harvest: failed job left pages: {status}, {n_latents} latents"
                    )
                if not (job.get("error") or "").strip():
                    result.problems.append("harvest: failed without a reason")
                outcome = f"failed cleanly before the kill ({(job.get('error') or '')[:80]})"
                result.notes.append(
                    "the harvest job failed before the worker could be killed: "
                    + (job.get("error") or "")
                )
            elif job.get("status") == "complete" and outcome == "not run":
                outcome = "completed before the kill (use more tokens)"
                result.problems.append(f"harvest: {outcome}: the kill tested nothing")
            elif outcome == "not run":
                result.problems.append(f"harvest: the job never ran: {job}")
        finally:
            worker.stop()
    return outcome


def edits_part(
    server: Server, key: str, result: SuiteResult, *, kills: int, writers: int, rng: random.Random,
    latents: int, seed: int, pause: tuple[float, float],
) -> Ledger:  # fmt: skip
    ledger = Ledger()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_writer,
            args=(w, server.base_url, key, w % latents, stop, ledger, seed),
            daemon=True,
        )
        for w in range(writers)
    ]
    for t in threads:
        t.start()
    restarts: list[float] = []
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(*pause))
            server.kill9()
            time.sleep(rng.uniform(0.0, 0.5))
            restarts.append(server.start_ready())
        time.sleep(rng.uniform(*pause))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    result.figures["restart_seconds"] = restarts
    return ledger


def run_kill9_suite(
    work: Path,
    models_dir: Path,
    db_url: str,
    *,
    kills: int = 2,
    writers: int = 4,
    harvest_tokens: int = 65_536,
    harvest_timeout: float = 240.0,
    pause: tuple[float, float] = (1.0, 3.0),
    seed: int = 0,
) -> SuiteResult:
    result = SuiteResult("kill9")
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    env = kronscope_env(
        db_url,
        work / "data",
        models_dir,
        run_jobs_in_process=False,
        job_poll_seconds=0.2,
        job_heartbeat_seconds=0.5,
        job_stale_seconds=3,
    )
    key = create_key(env, "kill9", "upload,explanations,jobs")
    server = Server(env, work / "server.log", no_jobs=True)
    try:
        server.start_ready()
        ckpt = make_checkpoint(work / "ckpt", seed=seed + 21)
        with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
            r = client.post(
                "/api/v1/saes",
                files=folder_parts(ckpt),
                data={"slug": SLUG},
                headers={"Authorization": f"Bearer {key}"},
            )
            if r.status_code != 201:
                raise RuntimeError(f"upload failed: {r.status_code} {r.text[:300]}")
            d_sae = int(r.json()["d_sae"])

        harvest = harvest_part(
            server, env, key, work, result, tokens=harvest_tokens, timeout=harvest_timeout, rng=rng
        )
        starts_before = server.starts
        ledger = edits_part(
            server, key, result, kills=kills, writers=writers, rng=rng, latents=d_sae, seed=seed,
            pause=pause,
        )  # fmt: skip
        with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
            lost, problems = _verify_edits(client, ledger)
        result.problems += ledger.problems + problems
        if ledger.acked == 0:
            result.problems.append("no write was acknowledged")
        server_kills = server.starts - starts_before
        result.figures.update(
            acked=ledger.acked, attempts=ledger.attempts, lost=lost, no_response=ledger.no_response,
            unavailable=ledger.unavailable, server_kills=server_kills, explanations=len(ledger.tracks),
        )  # fmt: skip
        result.notes.append(
            f"{ledger.attempts} writes tried by {writers} writers, {ledger.no_response} without a "
            f"response, {ledger.unavailable} answered 503; server restarts took "
            + ", ".join(f"{s:.1f}" for s in result.figures.get("restart_seconds", []))
            + " s"
        )
        result.line = (
            f"kill9: edits acknowledged {ledger.acked}, lost {lost} ({server_kills} server kills); "
            f"harvest {harvest}"
        )
    except Exception as exc:
        result.problems.append(f"suite error: {exc!r}\n{server.log_tail(1500)}")
        result.line = f"kill9: did not finish ({exc!r})"[:300]
    finally:
        server.stop()
    return result
