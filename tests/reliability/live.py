"""Suites 4 and 5 against one live ``kronscope serve`` on a scratch database:

- **pg-restart**: clients hammer reads while the database goes away: by default every
  connection of the server to its scratch PostgreSQL database is terminated
  (``pg_terminate_backend``); with ``real_restart`` the whole cluster is restarted
  (``pg_ctlcluster ... restart``: opt-in, it interrupts everyone's tests). Requests must
  fail fast (503 within ``bound_s``) or succeed, never anything else, and the server must
  recover by itself (same process).
- **load**: many concurrent clients on latent pages and live inference for a while: no
  errors except the designed 503 + Retry-After of a full inference queue (counted
  apart), and the server's memory sampled from start to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ._support import (
    RssSampler,
    Server,
    SuiteResult,
    create_key,
    folder_parts,
    kronscope_env,
    make_checkpoint,
    restart_postgres,
    run_async,
    seed_pages,
    terminate_backends,
)

SLUG = "live-kron"
H, M, N, K = 4, 4, 8, 8
F = H * M * N
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A sparse autoencoder reads the residual stream of a language model.",
    "def add(a, b):\n    return a + b",
    "Numbers like 3.14, 42 and 1e-5 appear in text too!",
    "the cat sat on the mat and the dog sat on the log",
    "KronSAE composes base and extension pre-latents with mAND.",
]


@dataclass
class Live:
    server: Server
    db_url: str
    key: str
    slug: str = SLUG

    @property
    def base_url(self) -> str:
        return self.server.base_url


@contextlib.contextmanager
def live_server(work: Path, models_dir: Path, db_url: str, **settings: Any) -> Iterator[Live]:
    """``kronscope serve`` on ``db_url`` with a KronSAE (F = 128) uploaded through the API,
    its pages written through the repositories, and the subject model loaded."""
    work.mkdir(parents=True, exist_ok=True)
    env = kronscope_env(db_url, work / "data", models_dir, run_jobs_in_process=False, **settings)
    key = create_key(env, "live", "upload,explanations,jobs")
    server = Server(env, work / "server.log", no_jobs=True)
    try:
        server.start_ready()
        ckpt = make_checkpoint(work / "ckpt", seed=31, h=H, m=M, n=N, k=K)
        with httpx.Client(base_url=server.base_url, timeout=300.0) as client:
            r = client.post(
                "/api/v1/saes",
                files=folder_parts(ckpt),
                data={"slug": SLUG},
                headers={"Authorization": f"Bearer {key}"},
            )
            if r.status_code != 201:
                raise RuntimeError(f"upload failed: {r.status_code} {r.text[:300]}")
            seed_pages(db_url, SLUG, seed=5)
            r = client.post(f"/api/v1/saes/{SLUG}/activations", json={"text": "warm up"})
            if r.status_code != 200:
                raise RuntimeError(f"warm-up inference failed: {r.status_code} {r.text[:300]}")
        yield Live(server, db_url, key)
    finally:
        server.stop()


def page_request(rng: random.Random, slug: str) -> tuple[str, str, str, dict[str, Any] | None]:
    """(kind, method, path, json body) of one page read."""
    roll = rng.random()
    if roll < 0.35:
        return "page", "GET", f"/api/v1/saes/{slug}/latents/{rng.randrange(F)}", None
    if roll < 0.7:
        sort = rng.choice(["index", "density", "max_activation"])
        order = rng.choice(["asc", "desc"])
        return (
            "page",
            "GET",
            f"/api/v1/saes/{slug}/latents?sort={sort}&order={order}&offset={rng.randrange(F)}&limit=50",
            None,
        )
    if roll < 0.8:
        return "page", "GET", f"/api/v1/saes/{slug}/heads/{rng.randrange(H)}", None
    if roll < 0.9:
        kind, size = rng.choice([("base", M), ("extension", N)])
        return (
            "page",
            "GET",
            f"/api/v1/saes/{slug}/parents/{kind}/{rng.randrange(H)}/{rng.randrange(size)}",
            None,
        )
    return "page", "GET", "/api/v1/saes", None


def inference_request(rng: random.Random, slug: str) -> tuple[str, str, str, dict[str, Any] | None]:
    roll = rng.random()
    if roll < 0.6:
        body: dict[str, Any] = {"text": rng.choice(TEXTS), "top_k_per_token": 3}
        if rng.random() < 0.3:
            body["latents"] = [rng.randrange(F) for _ in range(2)]
        return "inference", "POST", f"/api/v1/saes/{slug}/activations", body
    if roll < 0.8:
        return (
            "inference",
            "POST",
            f"/api/v1/saes/{slug}/activations",
            {"texts": rng.sample(TEXTS, 2)},
        )
    return (
        "inference",
        "POST",
        f"/api/v1/saes/{slug}/search",
        {"text": rng.choice(TEXTS), "limit": 10},
    )


@dataclass
class Outcome:
    kind: str
    t0: float
    t1: float
    status: int | None
    retry_after: bool = False
    error: str | None = None
    code: str | None = None
    """The error code of a 4xx/5xx body (``unavailable``, ``database_unavailable``, ...)."""


@dataclass
class Recorder:
    outcomes: list[Outcome] = field(default_factory=list)


async def _client_loop(
    cid: int, client: httpx.AsyncClient, slug: str, until: float, rec: Recorder, share: float
) -> None:
    rng = random.Random(cid)
    while time.monotonic() < until:
        kind, method, path, body = (
            inference_request(rng, slug) if rng.random() < share else page_request(rng, slug)
        )
        t0 = time.monotonic()
        try:
            r = await client.request(method, path, json=body)
            code = None
            if r.status_code == 200:
                r.json()
            elif r.status_code >= 400:
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    code = r.json()["error"]["code"]
            rec.outcomes.append(
                Outcome(kind, t0, time.monotonic(), r.status_code, "retry-after" in r.headers,
                        None if r.status_code < 400 else r.text[:200], code)
            )  # fmt: skip
        except (httpx.HTTPError, ValueError) as exc:
            rec.outcomes.append(Outcome(kind, t0, time.monotonic(), None, error=repr(exc)[:200]))
            await asyncio.sleep(0.05)
        if rec.outcomes[-1].status == 503:
            await asyncio.sleep(0.05)


async def _run_clients(
    base: str, slug: str, clients: int, seconds: float, share: float, timeout: float
) -> Recorder:
    rec = Recorder()
    # One AsyncClient for all loops, made before the clock starts: building one per loop
    # (an SSL context each) blocks the event loop for seconds on a busy machine and
    # inflates every latency measured meanwhile.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(_client_loop(c, client, slug, until, rec, share) for c in range(clients))
        )
    return rec


# -- suite 4 ------------------------------------------------------------------------------------
def run_pg_restart_suite(
    live: Live,
    *,
    duration: float = 12.0,
    clients: int = 8,
    disruptions: int = 2,
    real_restart: bool = False,
    bound_s: float = 5.0,
) -> SuiteResult:
    """Hammer reads for ``duration`` s while the database goes away ``disruptions`` times."""
    result = SuiteResult("pg-restart")
    pid = live.server.pid
    times: list[float] = []
    errors: list[str] = []

    def disrupt() -> None:
        for i in range(disruptions):
            time.sleep(duration / (disruptions + 1))
            times.append(time.monotonic())
            try:
                if real_restart:
                    took = restart_postgres()
                    result.notes.append(f"pg_ctlcluster restart {i + 1} took {took:.1f} s")
                else:
                    n = terminate_backends(live.db_url)
                    result.notes.append(f"disruption {i + 1}: terminated {n} connections")
            except Exception as exc:
                errors.append(f"disruption {i + 1} failed: {exc!r}")

    thread = threading.Thread(target=disrupt, name="pg-disrupt", daemon=True)
    thread.start()
    rec = run_async(_run_clients(live.base_url, live.slug, clients, duration, 0.0, 30.0))
    thread.join(120)
    result.problems += errors

    outcomes = sorted(rec.outcomes, key=lambda o: o.t0)
    ok = [o for o in outcomes if o.status == 200]
    unavailable = [o for o in outcomes if o.status == 503]
    other = [o for o in outcomes if o.status not in (200, 503)]
    for o in other[:10]:
        result.problems.append(f"{o.status or 'no response'}: {o.error}")
    slow = [o for o in unavailable if o.t1 - o.t0 > bound_s]
    if slow:
        result.problems.append(
            f"{len(slow)} 503s slower than {bound_s} s (slowest {max(o.t1 - o.t0 for o in slow):.1f} s)"
        )
    no_retry = [o for o in unavailable if not o.retry_after]
    if no_retry:
        result.problems.append(f"{len(no_retry)} 503s without Retry-After")

    recovered: list[float] = []
    for i, td in enumerate(times):
        end = times[i + 1] if i + 1 < len(times) else float("inf")
        # Failures this disruption caused: in flight at td, or started before the next one.
        failed = [o for o in outcomes if o.status != 200 and o.t1 >= td and o.t0 < end]
        after = max((o.t0 for o in failed), default=td)
        first_ok = min(
            (o for o in outcomes if o.status == 200 and o.t0 >= after),
            key=lambda o: o.t1,
            default=None,
        )
        if first_ok is None:
            result.problems.append(f"no successful request after disruption {i + 1}")
        else:
            recovered.append(first_ok.t1 - td)
    # Recovery without a restart: the same process answers, and is ready.
    if live.server.pid != pid or not live.server.running:
        result.problems.append("the server process did not survive")
    deadline = time.monotonic() + 30
    ready = False
    while time.monotonic() < deadline and not ready:
        with contextlib.suppress(httpx.HTTPError):
            ready = httpx.get(f"{live.base_url}/api/v1/health/ready", timeout=5).status_code == 200
        if not ready:
            time.sleep(0.5)
    if not ready:
        result.problems.append("the server was not ready again 30 s after the last disruption")
    worst = max(recovered) if recovered else float("nan")
    max_503 = max((o.t1 - o.t0 for o in unavailable), default=0.0)
    mode = "cluster restarts" if real_restart else "backends terminated"
    result.figures = {
        "requests": len(outcomes), "ok": len(ok), "503": len(unavailable), "other": len(other),
        "recovered_s": recovered, "max_503_s": max_503, "mode": mode, "disruptions": len(times),
    }  # fmt: skip
    result.notes.append(
        f"{len(times)} disruptions ({mode}), {clients} clients for {duration:.0f} s; slowest 503 "
        f"{max_503:.2f} s; slowest request {max((o.t1 - o.t0 for o in outcomes), default=0):.2f} s"
    )
    result.line = (
        f"pg-restart: requests {len(outcomes)}, 503 {len(unavailable)}, other errors "
        f"{len(other)}, recovered in {worst:.1f} s"
    )
    return result


# -- suite 5 ------------------------------------------------------------------------------------
def run_load_suite(
    live: Live,
    *,
    clients: int = 64,
    duration: float = 60.0,
    inference_share: float = 0.5,
    timeout: float = 120.0,
    max_growth_mb: float = 768.0,
) -> SuiteResult:
    """``clients`` concurrent clients for ``duration`` s on pages and live inference."""
    result = SuiteResult("load")
    assert live.server.pid is not None
    with RssSampler(live.server.pid, interval=0.5) as rss:
        time.sleep(0.6)  # a first sample before the load
        t0 = time.monotonic()
        rec = run_async(
            _run_clients(live.base_url, live.slug, clients, duration, inference_share, timeout)
        )
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # and one after it
    outcomes = rec.outcomes
    pages = [o for o in outcomes if o.kind == "page"]
    inference = [o for o in outcomes if o.kind == "inference"]
    # The designed 503: the inference queue is full (or the request waited too long in it),
    # with Retry-After. A 503 because no database connection was free is not that.
    busy = [o for o in inference if o.status == 503 and o.retry_after and o.code == "unavailable"]
    errors = [
        o for o in outcomes if not (o.status is not None and o.status < 400) and o not in busy
    ]
    kinds: dict[str, int] = {}
    for o in errors:
        label = f"{o.kind} {o.status or 'no response'}"
        kinds[label] = kinds.get(label, 0) + 1
    for label, n in sorted(kinds.items()):
        example = next(o for o in errors if f"{o.kind} {o.status or 'no response'}" == label)
        result.problems.append(f"{n} x {label}: {example.error}")
    if not live.server.running:
        result.problems.append("the server died")
    growth = rss.peak_mb - rss.start_mb
    if growth > max_growth_mb:
        result.problems.append(f"memory grew by {growth:.0f} MiB (bound {max_growth_mb:.0f})")
    lat = sorted(o.t1 - o.t0 for o in outcomes if o.status == 200)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    result.figures = {
        "requests": len(outcomes), "pages": len(pages), "inference": len(inference),
        "busy_503": len(busy), "errors": len(errors), "rss_mb": (rss.start_mb, rss.peak_mb, rss.end_mb),
        "seconds": elapsed, "p99_s": p99,
    }  # fmt: skip
    result.notes.append(
        f"{len(outcomes) / elapsed:.0f} requests/s, p99 of successes {p99 * 1000:.0f} ms, "
        f"{len(rss.samples)} RSS samples"
    )
    result.line = (
        f"load: {clients} clients x {duration:.0f} s, requests {len(outcomes)} (pages "
        f"{len(pages)}, inference {len(inference)}), errors {len(errors)}, inference 503 busy "
        f"{len(busy)}, server RSS MiB start/peak/end {rss.start_mb:.0f}/{rss.peak_mb:.0f}/{rss.end_mb:.0f}"
    )
    return result
