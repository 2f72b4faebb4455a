"""Live inference on any text: ``POST /saes/{sae}/activations`` and ``POST /saes/{sae}/search``,
and ``GET /inference/status`` (the engine's queue, loaded models and batch counters).

The routes are thin: ``services.inference`` checks, batches and computes. The request's
database session is committed (its connection returned to the pool) as soon as the SAE
is resolved, so a request waiting for the model holds no database connection. Responses
are serialised in a worker thread and returned as they are (the documented response
models describe them but are not re-validated, which would cost more than the inference
of a short text).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema
from starlette.concurrency import run_in_threadpool

from ..config import Settings
from ..db.models import UnitKind
from ..db.repositories import explanations as expl_repo
from ..services import inference as svc
from ..services import sae_registry, tx
from ..services.errors import Unprocessable
from . import PREFIX
from .deps import ReaderDep, SettingsDep, ensure_database, require_read
from .routes._common import ERROR_RESPONSES
from .routing import APIRouteChecked

router = APIRouter(
    prefix=PREFIX, tags=["inference"], route_class=APIRouteChecked, responses=ERROR_RESPONSES
)
_BUSY: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "Busy (queue full), timed out, or the model cannot be loaded now; see Retry-After."
    }
}


# -- request and response models -------------------------------------------------------------
class ActivationsRequest(BaseModel):
    # "exactly one of text and texts", said in the schema too (null is not offered there)
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["texts"]}]},
    )

    text: str | SkipJsonSchema[None] = Field(
        default=None, min_length=1, description="One text. Send this or `texts`."
    )
    texts: list[str] | SkipJsonSchema[None] = Field(
        default=None, description="Several texts, run together."
    )
    latents: list[int] | None = Field(
        default=None,
        description="Latents whose value (and parents' values) to return at every token.",
    )
    top_k_per_token: int = Field(
        default=5, ge=0, le=svc.MAX_TOP_K, description="Largest latents (and parents) per token."
    )

    @model_validator(mode="after")
    def _one_of(self) -> ActivationsRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of 'text' and 'texts'")
        return self

    @property
    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="The text to search latents on.")
    rank_by: Literal["max", "sum"] = Field(
        default="max", description="Rank by the maximum or the sum over positions."
    )
    positions: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        description="Token positions to restrict to (default: every non-special token).",
    )
    include_special: bool = Field(
        default=False, description="Count special tokens (BOS, ...) when no positions are given."
    )
    limit: int = Field(default=20, ge=1, le=500)


class TopLatent(BaseModel):
    index: int
    value: float
    head: int | None = None
    base: int | None = None
    extension: int | None = None


class RequestedLatent(BaseModel):
    index: int
    value: float = Field(description="The latent's activation (0 where TopK did not keep it).")
    pre_topk: float | None = Field(
        default=None, description="KronSAE: mAND of its parents before TopK."
    )
    base_value: float | None = None
    extension_value: float | None = None


class ParentValue(BaseModel):
    head: int
    index: int
    value: float


class TokenParents(BaseModel):
    base: list[ParentValue]
    extension: list[ParentValue]


class TokenOut(BaseModel):
    position: int
    token: str = Field(description="The token as the tokenizer writes it (not escaped).")
    token_id: int
    special: bool
    top_latents: list[TopLatent]
    latents: list[RequestedLatent] | None = None
    parents: TokenParents | None = Field(default=None, description="KronSAE: the largest parents.")


class TextOut(BaseModel):
    text_index: int
    n_tokens: int
    tokens: list[TokenOut]


class ActivationsOut(BaseModel):
    sae: str
    architecture: str
    top_k_per_token: int
    latents: list[int]
    texts: list[TextOut]


class SearchItem(BaseModel):
    index: int
    score: float
    max_value: float
    sum_value: float
    n_active: int = Field(description="Positions where it fires.")
    max_position: int
    max_token: str | None
    head: int | None = None
    base: int | None = None
    extension: int | None = None
    explanation: str | None = None


class SearchOut(BaseModel):
    sae: str
    rank_by: str
    positions: list[int]
    tokens: list[str]
    items: list[SearchItem]
    total: int = Field(description="Latents that fire on the positions.")


def _json(payload: dict[str, Any]) -> Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, media_type="application/json")


def _admit(request: Request, settings: SettingsDep) -> Iterator[svc.Admission]:
    """Announce the request to the engine before anything else (the SAE lookup, the body),
    so the worker knows it is coming; released once queued, or when the request ends."""
    with svc.engine_for(request.app.state, settings).admit() as admission:
        yield admission


AdmissionDep = Annotated[svc.Admission, Depends(_admit, scope="function")]


async def _resolve(
    request: Request,
    settings: SettingsDep,
    sae: Annotated[str, Path(min_length=1, max_length=128, description="The SAE's slug.")],
) -> tuple[int, svc.SaeSpec]:
    """The SAE's id and spec (see ``_read_spec``), holding one of the app's database slots
    (``api.deps``) meanwhile."""
    await ensure_database(request)
    async with request.app.state.db_slots:
        return await run_in_threadpool(_read_spec, request, settings, sae)


def _read_spec(request: Request, settings: Settings, sae: str) -> tuple[int, svc.SaeSpec]:
    """The SAE's id and spec, read (with the reader check) in one short session that is
    closed before this returns. These routes wait on the engine for a long time: holding a
    pooled connection across those awaits starves the thread pool and the connection pool
    of each other under load, so no connection outlives this function."""
    state = request.app.state
    with state.sessionmaker() as session:
        try:
            require_read(request, settings, session)
            row = sae_registry.get_sae(session, sae)
            return row.id, svc.SaeSpec.from_row(row, settings)
        finally:
            tx.rollback(session)


SpecDep = Annotated[tuple[int, svc.SaeSpec], Depends(_resolve)]


async def _prepare(
    request: Request, spec: svc.SaeSpec, settings: Any, texts: list[str]
) -> tuple[svc.InferenceEngine, svc.Loaded, svc.Prepared]:
    """Load and tokenise (in worker threads)."""
    cleaned = svc.check_texts(texts, settings)
    engine = svc.engine_for(request.app.state, settings)
    loaded = await run_in_threadpool(engine.load, spec)
    prepared = await run_in_threadpool(engine.prepare, loaded, cleaned)
    return engine, loaded, prepared


# -- routes ----------------------------------------------------------------------------------------
@router.post(
    "/saes/{sae}/activations",
    response_model=None,
    responses={200: {"model": ActivationsOut}, **_BUSY},
    summary="Live inference on text",
)
async def activations(
    admission: AdmissionDep,
    request: Request,
    resolved: SpecDep,
    settings: SettingsDep,
    body: ActivationsRequest,
) -> Response:
    """Runs the subject model up to the hook and the SAE on the text(s). Per token: the
    largest latents (with head, base and extension for KronSAE), the requested latents'
    values (and their parents' values), and the largest base and extension parents.
    Concurrent requests are batched together. 413 over the byte limit, 422 for empty text,
    NUL characters, too many tokens or an out-of-range latent, 503 when busy."""
    spec = resolved[1]
    latents = svc.check_latents(spec, body.latents)
    engine, loaded, prepared = await _prepare(request, spec, settings, body.all_texts)
    results = await engine.run(
        loaded,
        prepared,
        mode="activations",
        top_k=body.top_k_per_token,
        latents=latents,
        admission=admission,
    )
    payload = await run_in_threadpool(
        svc.activations_response,
        spec,
        prepared,
        results,
        top_k=body.top_k_per_token,
        latents=latents,
    )
    return await run_in_threadpool(_json, payload)


@router.post(
    "/saes/{sae}/search",
    response_model=None,
    responses={200: {"model": SearchOut}, **_BUSY},
    summary="Which latents fire on a text",
)
async def search(
    admission: AdmissionDep,
    request: Request,
    resolved: SpecDep,
    settings: SettingsDep,
    body: SearchRequest,
) -> Response:
    """Latents ranked by their maximum (or sum) over the text's tokens, optionally only at
    the given positions; special tokens count only when asked for. Each latent comes with
    where it peaks and its best explanation."""
    sae_id, spec = resolved
    engine, loaded, prepared = await _prepare(request, spec, settings, [body.text])
    n_tokens = len(prepared.rows[0])
    if body.positions is not None:
        bad = [p for p in body.positions if not 0 <= p < n_tokens]
        if bad:
            raise Unprocessable(
                f"Position {bad[0]} is out of range: the text has tokens 0 to {n_tokens - 1}.",
                detail={"position": bad[0], "n_tokens": n_tokens},
            )
        chosen = set(body.positions)
        keep = [p in chosen for p in range(n_tokens)]
    else:
        keep = [body.include_special or not s for s in prepared.special[0]]
    results = await engine.run(
        loaded, prepared, mode="search", positions=[keep], admission=admission
    )
    items, total = await run_in_threadpool(
        svc.search_ranking, spec, prepared, results[0], keep, rank_by=body.rank_by, limit=body.limit
    )

    def explain() -> None:
        with request.app.state.sessionmaker() as session:
            try:
                found = expl_repo.explanations_for_units(
                    session, sae_id, UnitKind.LATENT, [i["index"] for i in items]
                )
                for item in items:
                    best = found.get(item["index"])
                    item["explanation"] = best[0].text if best else None
            finally:
                tx.rollback(session)

    async with request.app.state.db_slots:
        await run_in_threadpool(explain)
    return _json(
        {
            "sae": spec.slug,
            "rank_by": body.rank_by,
            "positions": [p for p, k in enumerate(keep) if k],
            "tokens": prepared.tokens[0],
            "items": items,
            "total": total,
        }
    )


class EngineStatus(BaseModel):
    device: str
    worker_alive: bool
    queue_depth: int
    queue_size: int
    max_batch: int
    batch_wait_ms: float
    incoming: int
    mean_batch_seconds: float
    loaded_models: list[str]
    loaded_saes: list[str]
    counters: dict[str, Any]


@router.get("/inference/status", response_model=EngineStatus, summary="The live inference engine")
def engine_status(request: Request, settings: SettingsDep, _: ReaderDep) -> dict[str, Any]:
    """Device, queue depth, loaded models and SAEs, and batch counters (``batched_requests``
    counts requests that shared a batch with others)."""
    return svc.engine_for(request.app.state, settings).status()
