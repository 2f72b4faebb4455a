"""KronSAE parents (pre-latents): one base or extension parent's page."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Query, Request, Response

from ...services import features
from ..deps import SaeSlug, read_json
from ..schemas import ParentDetail
from ._common import make_router

router = make_router("parents")


@router.get(
    "/saes/{sae}/parents/{kind}/{head}/{index}",
    response_model=ParentDetail,
    summary="One KronSAE parent",
)
async def get_parent(
    request: Request,
    sae: SaeSlug,
    kind: Literal["base", "extension"],
    head: int,
    index: int,
    top_k: Annotated[int, Query(ge=0, le=100)] = 20,
    intervals: Annotated[int, Query(ge=0, le=20)] = 5,
    mode: Annotated[Literal["width", "quantile"], Query()] = "width",
    per_interval: Annotated[int, Query(ge=1, le=50)] = 5,
) -> Response:
    """Stats, examples and children latents of base parent ``p[head, index]`` or extension
    parent ``q[head, index]``."""
    return await read_json(
        request,
        lambda session: features.parent_detail(
            session,
            sae,
            kind,
            head,
            index,
            top_k=top_k,
            intervals=intervals,
            mode=mode,
            per_interval=per_interval,
        ),
    )
