"""Tool pages: live text, search, upload, job progress.

These pages are mostly driven by their scripts, which call the JSON API; the server
renders the form (pre-filled from the query string, so each state is a deep link) and the
facts that need no model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from ..db.models import Sae
from ..db.repositories import jobs as job_repo
from ..db.repositories import saes as sae_repo
from ..services import explanations as expl_svc
from ..services import features, harvest_jobs, sae_registry
from ..services.errors import NotFound
from ..services.jobs import job_dict
from .context import MAX_PREFILL, PageDep

router = APIRouter(include_in_schema=False)

SEARCH_PAGE_SIZE = 20


def _latent_param(raw: str | None, sae: Sae) -> int | None:
    if raw is None or not raw.strip().isdigit():
        return None
    value = int(raw.strip())
    return value if value < sae.d_sae else None


@router.get("/saes/{slug}/live")
def live_page(
    page: PageDep, slug: str, text: str | None = None, latent: str | None = None
) -> Response:
    sae_row = sae_registry.get_sae(page.session, slug)
    return page.render(
        "live.html",
        sae=features.sae_dict(page.session, sae_row),
        text=(text or "")[:MAX_PREFILL],
        latent=_latent_param(latent, sae_row),
    )


# -- search -----------------------------------------------------------------------------------------------
def _unit_link(sae: str, unit: dict[str, Any]) -> tuple[str, str]:
    """``(label, page path)`` of the unit an explanation describes (``services.explanations.unit_dict``)."""
    kind, index = unit["kind"], unit["index"]
    if kind == "latent":
        return f"latent {index}", f"/saes/{sae}/latents/{index}"
    head, within = unit["head"], unit["index_in_head"]
    return f"{kind} parent {within} of head {head}", f"/saes/{sae}/parents/{kind}/{head}/{within}"


@router.get("/search")
def search_page(
    page: PageDep,
    q: str | None = None,
    sae: str | None = None,
    text: str | None = None,
    p: str | None = None,
) -> Response:
    query = (q or "").strip()[:500]
    try:
        number = max(1, int(p or 1))
    except ValueError:
        number = 1
    results: list[dict[str, Any]] = []
    total = 0
    if query:
        found = expl_svc.search(
            page.session, query, limit=SEARCH_PAGE_SIZE, offset=(number - 1) * SEARCH_PAGE_SIZE
        )
        total = found["total"]
        for hit in found["items"]:
            label, href = _unit_link(hit["sae"], hit["unit"])
            results.append({**hit, "label": label, "href": href})
    slugs = [s.slug for s in sae_repo.list_saes(page.session, limit=500).items]
    return page.render(
        "search.html",
        q=query,
        results=results,
        total=total,
        page_number=number,
        pages=max(1, -(-total // SEARCH_PAGE_SIZE)),
        saes=slugs,
        chosen_sae=sae if sae in slugs else None,
        text=(text or "")[:MAX_PREFILL],
    )


# -- upload and jobs ---------------------------------------------------------------------------------------
@router.get("/upload")
def upload_page(page: PageDep) -> Response:
    return page.render(
        "upload.html",
        can_upload=page.can("upload"),
        corpora=harvest_jobs.available_corpora(page.settings),
        defaults=harvest_jobs.DEFAULTS,
        max_bytes=page.settings.max_upload_bytes,
        checkpoint_files=sae_registry.CHECKPOINT_FILES,
        archive_suffixes=sae_registry.ARCHIVE_SUFFIXES,
    )


@router.get("/jobs/{job_id}")
def job_page(page: PageDep, job_id: str) -> Response:
    job = job_repo.get_job(page.session, job_id[:64])
    if job is None:
        raise NotFound(f"There is no job {job_id!r}.")
    return page.render("job.html", job=job_dict(page.session, job), can_cancel=page.can("jobs"))
