"""Harvests of one SAE: list them, start one (a job; 202)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, status

from ...db.repositories import harvests as harvest_repo
from ...services import features, harvest_jobs
from ...services.jobs import job_dict
from ..deps import JobsDep, ReaderDep, SAEDep, SessionDep, SettingsDep
from ..schemas import HarvestOut, HarvestRequest, HarvestStarted, Page
from ._common import make_router

router = make_router("harvests")


@router.get("/saes/{sae}/harvests", response_model=Page[HarvestOut], summary="Harvests of an SAE")
def list_harvests(sae: SAEDep, session: SessionDep, _: ReaderDep) -> dict[str, Any]:
    items = harvest_repo.list_harvests(session, sae.id)
    return {
        "items": [features.harvest_dict(h, sae.active_harvest_id) for h in items],
        "total": len(items),
        "limit": len(items),
        "offset": 0,
    }


@router.post(
    "/saes/{sae}/harvests",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=HarvestStarted,
    summary="Start a harvest job",
)
def start_harvest(
    sae: SAEDep,
    session: SessionDep,
    settings: SettingsDep,
    _: JobsDep,
    body: Annotated[HarvestRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Queue one pass of the subject model and the SAE over a corpus. Poll the returned
    job at ``/api/v1/jobs/{job}``; pages switch to the new harvest when it completes."""
    values = (body or HarvestRequest()).model_dump()
    job = harvest_jobs.start_harvest(session, settings, sae, values)
    harvest = harvest_repo.get_harvest(session, job.harvest_id) if job.harvest_id else None
    return {
        "harvest": features.harvest_dict(harvest, sae.active_harvest_id) if harvest else None,
        "job": job_dict(session, job),
    }
