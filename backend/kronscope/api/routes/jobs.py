"""Jobs: list, one job (status, progress, rate, ETA, error), cancel."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Query

from ...db.models import Job
from ...db.repositories import jobs as job_repo
from ...services import sae_registry
from ...services.errors import Conflict, NotFound
from ...services.jobs import job_dict
from ..deps import JobsDep, ReaderDep, SessionDep
from ..schemas import JobOut, Page
from ._common import make_router

router = make_router("jobs")

JobId = Annotated[str, Path(min_length=1, max_length=64, description="The job's id.")]
StatusName = Literal["queued", "running", "complete", "failed", "cancelled"]


def _job(session: SessionDep, job: str) -> Job:
    found = job_repo.get_job(session, job)
    if found is None:
        raise NotFound(f"There is no job {job!r}.", detail={"job": job})
    return found


@router.get("/jobs", response_model=Page[JobOut], summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    _: ReaderDep,
    status: Annotated[StatusName | None, Query()] = None,
    sae: Annotated[str | None, Query(max_length=128, description="Only this SAE's jobs.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> dict[str, Any]:
    sae_id = sae_registry.get_sae(session, sae).id if sae else None
    page = job_repo.list_jobs(session, status=status, sae_id=sae_id, limit=limit, offset=offset)
    return {
        "items": [job_dict(session, j) for j in page.items],
        "total": page.total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/jobs/{job}", response_model=JobOut, summary="One job")
def get_job(job: JobId, session: SessionDep, _: ReaderDep) -> dict[str, Any]:
    return job_dict(session, _job(session, job))


@router.post("/jobs/{job}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job: JobId, session: SessionDep, _: JobsDep) -> dict[str, Any]:
    """A running job stops at its next progress report; a harvest keeps what it saved."""
    found = _job(session, job)
    if not job_repo.cancel_job(session, found.id):
        raise Conflict(
            f"Job {job} is already {found.status}; it cannot be cancelled.",
            detail={"status": found.status},
        )
    return job_dict(session, _job(session, job))
