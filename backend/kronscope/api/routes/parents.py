"""KronSAE parents (pre-latents): one base or extension parent's page."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query

from ...services import features
from ..deps import ReaderDep, SAEDep, SessionDep
from ..schemas import ParentDetail
from ._common import make_router

router = make_router("parents")


@router.get(
    "/saes/{sae}/parents/{kind}/{head}/{index}",
    response_model=ParentDetail,
    summary="One KronSAE parent",
)
def get_parent(
    sae: SAEDep,
    kind: Literal["base", "extension"],
    head: int,
    index: int,
    session: SessionDep,
    _: ReaderDep,
    top_k: Annotated[int, Query(ge=0, le=100)] = 20,
    intervals: Annotated[int, Query(ge=0, le=20)] = 5,
    mode: Annotated[Literal["width", "quantile"], Query()] = "width",
    per_interval: Annotated[int, Query(ge=1, le=50)] = 5,
) -> dict[str, Any]:
    """Stats, examples and children latents of base parent ``p[head, index]`` or extension
    parent ``q[head, index]``."""
    return features.parent_detail(
        session,
        sae,
        kind,
        head,
        index,
        top_k=top_k,
        intervals=intervals,
        mode=mode,
        per_interval=per_interval,
    )
