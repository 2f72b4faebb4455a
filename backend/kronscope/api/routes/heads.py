"""One KronSAE head as its m x n grid of latents."""

from __future__ import annotations

from typing import Any

from ...services import features
from ..deps import ReaderDep, SAEDep, SessionDep
from ..schemas import HeadGrid
from ._common import make_router

router = make_router("heads")


@router.get("/saes/{sae}/heads/{head}", response_model=HeadGrid, summary="A head's m x n grid")
def get_head(sae: SAEDep, head: int, session: SessionDep, _: ReaderDep) -> dict[str, Any]:
    """Each latent's density, maximum and explanation; rows labelled by the base parents'
    explanations, columns by the extension parents'."""
    return features.head_grid(session, sae, head)
