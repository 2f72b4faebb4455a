"""``GET /saes/{sae}/export``: the SAE's features, activations and explanations as
Neuronpedia-compatible JSONL batches, streamed (a zip by default, or JSON lines with a
``type`` field). The format is described in ``services.export``; ``kronscope import``
reads it back."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ..services import export as svc
from ..services.errors import Unprocessable
from . import PREFIX
from .deps import ReaderDep, SAEDep
from .routes._common import ERROR_RESPONSES
from .routing import APIRouteChecked

router = APIRouter(
    prefix=PREFIX, tags=["export"], route_class=APIRouteChecked, responses=ERROR_RESPONSES
)


@router.get(
    "/saes/{sae}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/zip": {}, "application/x-ndjson": {}},
            "description": "The export, streamed.",
        }
    },
    summary="Export an SAE (Neuronpedia-compatible JSONL batches)",
)
def export_sae(
    request: Request,
    sae: SAEDep,
    _: ReaderDep,
    format: Annotated[
        Literal["zip", "jsonl"], Query(description="zip of batch files, or JSON lines.")
    ] = "zip",
    sections: Annotated[
        str,
        Query(
            max_length=100,
            pattern=r"^(features|explanations|activations)(,(features|explanations|activations))*$",
            description="Comma-separated: features, activations, explanations.",
        ),
    ] = "features,activations,explanations",
    parents: Annotated[bool, Query(description="KronSAE: include the parents' records.")] = True,
) -> StreamingResponse:
    """A zip laid out as Neuronpedia's exporter (``<model>/<sae>/features/batch-0.jsonl``,
    ``explanations/...``, ``activations/...``) plus ``kronscope.json`` and the KronSAE
    parents under ``kronscope-parents/``; or, with ``format=jsonl``, one JSON object a line
    with ``type`` = ``sae`` | ``feature`` | ``explanation`` | ``activation``. Explanations
    are exported even without a harvest."""
    chosen = [s.strip() for s in sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in svc.SECTIONS]
    if unknown or not chosen:
        raise Unprocessable(
            f"Unknown section {unknown[0]!r}: use {', '.join(svc.SECTIONS)}."
            if unknown
            else f"Name at least one section: {', '.join(svc.SECTIONS)}.",
            detail={"field": "sections"},
        )
    factory = request.app.state.sessionmaker
    name = f"{sae.slug}-export"
    if format == "zip":
        body = svc.export_zip(factory, sae.id, sections=chosen, parents=parents)
        media, filename = "application/zip", f"{name}.zip"
    else:
        body = svc.export_jsonl(factory, sae.id, sections=chosen, parents=parents)
        media, filename = "application/x-ndjson", f"{name}.jsonl"
    return StreamingResponse(
        body,
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
