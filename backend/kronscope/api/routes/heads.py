"""One KronSAE head as its m x n grid of latents."""

from __future__ import annotations

from fastapi import Request, Response

from ...services import features
from ..deps import SaeSlug, read_json
from ..schemas import HeadGrid
from ._common import make_router

router = make_router("heads")


@router.get("/saes/{sae}/heads/{head}", response_model=HeadGrid, summary="A head's m x n grid")
async def get_head(request: Request, sae: SaeSlug, head: int) -> Response:
    """Each latent's density, maximum and explanation; rows labelled by the base parents'
    explanations, columns by the extension parents'."""
    return await read_json(
        request,
        lambda session: features.head_grid(session, sae, head),
    )
