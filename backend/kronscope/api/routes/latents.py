"""Latents of an SAE: browse (sort, filter, search, paginate) and one latent's page."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Query, Request, Response

from ...services import features
from ..deps import SaeSlug, read_json
from ..schemas import LatentDetail, LatentPage
from ._common import make_router

router = make_router("latents")

Density = Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False)]


@router.get("/saes/{sae}/latents", response_model=LatentPage, summary="Browse latents")
async def list_latents(
    request: Request,
    sae: SaeSlug,
    sort: Literal["index", "density", "max_activation"] = "index",
    order: Annotated[
        Literal["asc", "desc"] | None,
        Query(description="Default: asc for index, desc otherwise."),
    ] = None,
    min_density: Density = None,
    max_density: Density = None,
    head: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="KronSAE head.")] = None,
    has_explanation: bool | None = None,
    q: Annotated[
        str | None, Query(max_length=500, description="Text query over explanations.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> Response:
    """Latents of the active harvest with their density, maximum and best explanation.
    Empty (``harvest_status`` says why) until a harvest completes."""
    return await read_json(
        request,
        lambda session: features.list_latents(
            session,
            sae,
            sort=sort,
            order=order,
            min_density=min_density,
            max_density=max_density,
            head=head,
            has_explanation=has_explanation,
            q=q,
            limit=limit,
            offset=offset,
        ),
    )


@router.get("/saes/{sae}/latents/{index}", response_model=LatentDetail, summary="One latent")
async def get_latent(
    request: Request,
    sae: SaeSlug,
    index: int,
    top_k: Annotated[int, Query(ge=0, le=100, description="Top examples to return.")] = 20,
    intervals: Annotated[
        int, Query(ge=0, le=20, description="Activation intervals of sampled examples.")
    ] = 5,
    mode: Annotated[
        Literal["width", "quantile"], Query(description="Equal-width or equal-count intervals.")
    ] = "width",
    per_interval: Annotated[int, Query(ge=1, le=50)] = 5,
) -> Response:
    """Stats, histogram, explanations, composition (KronSAE), top examples, sampled examples
    by activation interval, logit effects and neighbours."""
    return await read_json(
        request,
        lambda session: features.latent_detail(
            session,
            sae,
            index,
            top_k=top_k,
            intervals=intervals,
            mode=mode,
            per_interval=per_interval,
        ),
    )
