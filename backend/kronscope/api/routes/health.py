"""``GET /api/v1/health``: liveness and readiness (database reachable, device, version)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ... import __version__
from ...config import resolve_device
from ...db import check_connection, current_revision
from ...services.errors import ServiceUnavailable
from ..schemas import Health
from ._common import make_router

router = make_router("health")


def _check(request: Request) -> dict[str, Any]:
    state = request.app.state
    engine = state.engine
    database: dict[str, Any] = {"reachable": True, "dialect": engine.dialect.name}
    try:
        check_connection(engine)
        database["revision"] = current_revision(engine)
    except Exception as exc:
        database.update(reachable=False, error=str(exc).splitlines()[0][:300])
    try:
        device = resolve_device(state.settings.device)
    except RuntimeError as exc:
        device = f"unavailable ({exc})"
    runner = getattr(state, "job_runner", None)
    ready = bool(database["reachable"])
    return {
        "status": "ok" if ready else "degraded",
        "live": True,
        "ready": ready,
        "version": __version__,
        "device": device,
        "database": database,
        "jobs": {"in_process": runner is not None, "alive": bool(runner and runner.alive)},
    }


@router.get("/health", response_model=Health, summary="Liveness and readiness")
async def health(request: Request) -> dict[str, Any]:
    """Always 200 while the process serves requests; ``ready`` says whether the database
    is reachable."""
    return await run_in_threadpool(_check, request)


@router.get("/health/ready", response_model=Health, summary="Readiness (503 when not ready)")
async def ready(request: Request) -> dict[str, Any]:
    """200 when the database is reachable, else 503 with Retry-After (for load balancers)."""
    out = await run_in_threadpool(_check, request)
    if not out["ready"]:
        raise ServiceUnavailable(
            "Not ready: the database cannot be reached.",
            detail={"database": out["database"]},
        )
    return out
