"""Explanations: write with history, soft delete, full-text search, generation jobs.

- ``GET/POST /saes/{sae}/latents/{index}/explanations``; ``GET/PUT/DELETE .../{id}``
- the same under ``/saes/{sae}/parents/{kind}/{head}/{index}/explanations`` (KronSAE parents)
- ``GET /explanations/search?q=`` over every SAE (ranked, with highlights)
- ``POST /saes/{sae}/explain``: a job (202); poll ``/jobs/{job}``

Writes need a key with the ``explanations`` scope; its name is recorded as the author.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from ..services import explanations as svc
from ..services import sae_registry
from ..services.jobs import job_dict
from . import PREFIX
from .deps import ExplainerDep, ReaderDep, SAEDep, SessionDep, SettingsDep
from .routes._common import ERROR_RESPONSES
from .routing import APIRouteChecked
from .schemas import JobOut

router = APIRouter(
    prefix=PREFIX, tags=["explanations"], route_class=APIRouteChecked, responses=ERROR_RESPONSES
)

Index = Annotated[int, Path(ge=0, le=2**31 - 1, description="Latent index.")]
Head = Annotated[int, Path(ge=0, le=2**31 - 1)]
ParentIndex = Annotated[int, Path(ge=0, le=2**31 - 1, description="Index within the head.")]
ExplId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Explanation id.")]
ParentKind = Literal["base", "extension"]


# -- models --------------------------------------------------------------------------------------
# Said in the schema only, so that a refusal keeps the service's own plain message: some
# character that is not whitespace, and no NUL.
TEXT_SCHEMA: dict[str, Any] = {"pattern": r"^[^\x00]*[^\s\x00][^\x00]*$"}


class ExplanationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(
        min_length=1,
        max_length=svc.MAX_TEXT * 2,
        description="The explanation Not blank, no NUL characters.",
        json_schema_extra=TEXT_SCHEMA,
    )
    score: float | None = Field(default=None, allow_inf_nan=False, description="Optional score.")


class ExplanationEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(
        min_length=1,
        max_length=svc.MAX_TEXT * 2,
        description="The new version Not blank, no NUL characters.",
        json_schema_extra=TEXT_SCHEMA,
    )


class UnitOut(BaseModel):
    kind: Literal["latent", "base", "extension"]
    index: int = Field(description="Latent index, or the parent's flat index (g*m+i / g*n+j).")
    head: int | None = None
    base: int | None = None
    extension: int | None = None
    index_in_head: int | None = Field(default=None, description="Parents: i or j.")


class RevisionOut(BaseModel):
    text: str
    author: str | None
    source: str
    created_at: datetime


class ExplanationOut(BaseModel):
    id: int
    sae: str
    unit: UnitOut
    text: str
    source: str = Field(description="human, heuristic or llm:<model>.")
    author: str | None
    score: float | None
    created_at: datetime
    updated_at: datetime
    deleted: bool
    history: list[RevisionOut] = Field(description="Every version, oldest first.")


class ExplanationList(BaseModel):
    items: list[ExplanationOut]
    total: int
    limit: int
    offset: int


class Segment(BaseModel):
    text: str
    match: bool


class SearchHitOut(BaseModel):
    id: int
    sae: str
    unit: UnitOut
    text: str
    source: str
    author: str | None
    score: float | None
    rank: float = Field(description="Relevance; higher is better.")
    snippet: list[Segment] = Field(description="The text around the matches, as segments.")
    snippet_html: str = Field(description="The snippet HTML-escaped, matches in <mark>.")
    updated_at: datetime


class SearchPage(BaseModel):
    items: list[SearchHitOut]
    total: int
    limit: int
    offset: int
    query: str


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["heuristic", "llm"] = Field(
        default="heuristic", description="heuristic (offline) or llm (the configured endpoint)."
    )
    units: Literal["latents", "parents", "all"] = "latents"
    overwrite: bool = Field(
        default=False,
        description="false: skip units already explained; true: revise this source's explanations.",
    )
    limit: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Explain only the first N units of each kind."
    )


# -- latents ---------------------------------------------------------------------------------------
@router.get(
    "/saes/{sae}/latents/{index}/explanations",
    response_model=ExplanationList,
    summary="A latent's explanations with history",
)
def list_latent_explanations(
    sae: SAEDep, index: Index, session: SessionDep, _: ReaderDep, include_deleted: bool = False
) -> dict[str, Any]:
    return svc.list_for_unit(
        session, sae, svc.latent_unit(sae, index), include_deleted=include_deleted
    )


@router.post(
    "/saes/{sae}/latents/{index}/explanations",
    status_code=status.HTTP_201_CREATED,
    response_model=ExplanationOut,
    summary="Explain a latent",
)
def create_latent_explanation(
    sae: SAEDep, index: Index, body: ExplanationIn, session: SessionDep, caller: ExplainerDep
) -> dict[str, Any]:
    return svc.create(
        session, sae, svc.latent_unit(sae, index), body.text, author=caller.name, score=body.score
    )


@router.get(
    "/saes/{sae}/latents/{index}/explanations/{explanation}",
    response_model=ExplanationOut,
    summary="One explanation with history",
)
def get_latent_explanation(
    sae: SAEDep, index: Index, explanation: ExplId, session: SessionDep, _: ReaderDep
) -> dict[str, Any]:
    return svc.get_one(session, sae, svc.latent_unit(sae, index), explanation)


@router.put(
    "/saes/{sae}/latents/{index}/explanations/{explanation}",
    response_model=ExplanationOut,
    summary="Edit an explanation (a new version; history kept)",
)
def edit_latent_explanation(
    sae: SAEDep,
    index: Index,
    explanation: ExplId,
    body: ExplanationEdit,
    session: SessionDep,
    caller: ExplainerDep,
) -> dict[str, Any]:
    return svc.update(
        session, sae, svc.latent_unit(sae, index), explanation, body.text, author=caller.name
    )


@router.delete(
    "/saes/{sae}/latents/{index}/explanations/{explanation}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete an explanation (soft: history kept)",
)
def delete_latent_explanation(
    sae: SAEDep, index: Index, explanation: ExplId, session: SessionDep, _: ExplainerDep
) -> Response:
    svc.delete(session, sae, svc.latent_unit(sae, index), explanation)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- KronSAE parents -------------------------------------------------------------------------------
_PARENT = "/saes/{sae}/parents/{kind}/{head}/{index}/explanations"


@router.get(_PARENT, response_model=ExplanationList, summary="A parent's explanations with history")
def list_parent_explanations(
    sae: SAEDep,
    kind: ParentKind,
    head: Head,
    index: ParentIndex,
    session: SessionDep,
    _: ReaderDep,
    include_deleted: bool = False,
) -> dict[str, Any]:
    unit = svc.parent_unit(sae, kind, head, index)
    return svc.list_for_unit(session, sae, unit, include_deleted=include_deleted)


@router.post(
    _PARENT,
    status_code=status.HTTP_201_CREATED,
    response_model=ExplanationOut,
    summary="Explain a parent",
)
def create_parent_explanation(
    sae: SAEDep,
    kind: ParentKind,
    head: Head,
    index: ParentIndex,
    body: ExplanationIn,
    session: SessionDep,
    caller: ExplainerDep,
) -> dict[str, Any]:
    unit = svc.parent_unit(sae, kind, head, index)
    return svc.create(session, sae, unit, body.text, author=caller.name, score=body.score)


@router.put(
    _PARENT + "/{explanation}", response_model=ExplanationOut, summary="Edit a parent's explanation"
)
def edit_parent_explanation(
    sae: SAEDep,
    kind: ParentKind,
    head: Head,
    index: ParentIndex,
    explanation: ExplId,
    body: ExplanationEdit,
    session: SessionDep,
    caller: ExplainerDep,
) -> dict[str, Any]:
    unit = svc.parent_unit(sae, kind, head, index)
    return svc.update(session, sae, unit, explanation, body.text, author=caller.name)


@router.delete(
    _PARENT + "/{explanation}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a parent's explanation (soft)",
)
def delete_parent_explanation(
    sae: SAEDep,
    kind: ParentKind,
    head: Head,
    index: ParentIndex,
    explanation: ExplId,
    session: SessionDep,
    _: ExplainerDep,
) -> Response:
    svc.delete(session, sae, svc.parent_unit(sae, kind, head, index), explanation)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- search and jobs -------------------------------------------------------------------------------
@router.get(
    "/explanations/search", response_model=SearchPage, summary="Search explanations of all SAEs"
)
def search_explanations(
    session: SessionDep,
    _: ReaderDep,
    q: Annotated[str, Query(max_length=1000, description='Words, "phrases", OR, -excluded.')],
    sae: Annotated[str | None, Query(max_length=128, description="Only this SAE.")] = None,
    kind: Annotated[Literal["latent", "base", "extension"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> dict[str, Any]:
    """Ranked by each database's full-text relevance (FTS5 bm25 / ts_rank_cd). Any text is
    a valid query: operators other than quotes, OR and a leading '-' are read as words."""
    one = sae_registry.get_sae(session, sae) if sae else None
    return svc.search(session, q, limit=limit, offset=offset, sae=one, kind=kind)


class ExplainStarted(BaseModel):
    job: JobOut


@router.post(
    "/saes/{sae}/explain",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExplainStarted,
    summary="Start an explanation job",
)
def start_explain(
    sae: SAEDep,
    session: SessionDep,
    settings: SettingsDep,
    caller: ExplainerDep,
    body: Annotated[ExplainRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Generate explanations from the active harvest's examples: ``heuristic`` (offline) or
    ``llm`` (the server's configured OpenAI-compatible endpoint). All of a job's
    explanations are written together when it completes; a failed job writes none."""
    req = body or ExplainRequest()
    job = svc.start_explain(
        session,
        settings,
        sae,
        backend=req.backend,
        units=req.units,
        overwrite=req.overwrite,
        author=caller.name,
        limit=req.limit,
    )
    return {"job": job_dict(session, job)}
