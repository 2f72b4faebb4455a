"""SAEs: list, get, delete, upload (``/api/v1/saes``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request, Response, status
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ...config import Settings
from ...db.repositories import saes as sae_repo
from ...services import features, harvest_jobs, sae_registry, tx
from ...services.errors import Unprocessable
from ...services.jobs import job_dict
from ...services.keys import Caller
from ..deps import DeleterDep, ReaderDep, SAEDep, SessionDep, SettingsDep, UploaderDep
from ..schemas import Page, SAEOut, SAEUploaded
from ..uploads import UPLOAD_OPENAPI, ReceivedUpload, receive_upload
from ._common import make_router

router = make_router("saes")

LimitQ = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
OffsetQ = Annotated[int, Query(ge=0, le=2**31 - 1, description="Items to skip.")]


@router.get("/saes", response_model=Page[SAEOut], summary="List SAEs")
def list_saes(
    session: SessionDep, _: ReaderDep, limit: LimitQ = 50, offset: OffsetQ = 0
) -> dict[str, Any]:
    page = sae_repo.list_saes(session, limit=limit, offset=offset)
    return {
        "items": [features.sae_dict(session, s) for s in page.items],
        "total": page.total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/saes/{sae}", response_model=SAEOut, summary="One SAE")
def get_sae(sae: SAEDep, session: SessionDep, _: ReaderDep) -> dict[str, Any]:
    return features.sae_dict(session, sae)


@router.delete(
    "/saes/{sae}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete an SAE with its data and files",
)
def delete_sae(sae: SAEDep, session: SessionDep, settings: SettingsDep, _: DeleterDep) -> Response:
    sae_registry.delete_sae(session, settings, sae.slug)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _int_field(fields: dict[str, str], name: str) -> int | None:
    raw = fields.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise Unprocessable(
            f"The form field {name!r} must be a whole number, not {raw!r}."
        ) from None


def _harvest_values(fields: dict[str, str]) -> dict[str, Any] | None:
    flag = fields.get("harvest", "").strip().lower()
    if flag not in _TRUE | _FALSE:
        raise Unprocessable(f"The form field 'harvest' must be true or false, not {flag!r}.")
    wanted = flag in _TRUE or any(k.startswith("harvest_") and v.strip() for k, v in fields.items())
    if not wanted:
        return None
    values: dict[str, Any] = {
        "corpus": fields.get("harvest_corpus", "").strip() or None,
        "tokens": _int_field(fields, "harvest_tokens"),
        "ctx_len": _int_field(fields, "harvest_ctx_len"),
        "examples_per_latent": _int_field(fields, "harvest_examples"),
    }
    limits = {"tokens": (1, 10**11), "ctx_len": (2, 8192), "examples_per_latent": (1, 200)}
    for key, (lo, hi) in limits.items():
        v = values[key]
        if v is not None and not lo <= v <= hi:
            raise Unprocessable(f"The harvest {key} must be between {lo} and {hi}, not {v}.")
    return values


def _register(
    session: Session, settings: Settings, received: ReceivedUpload, caller: Caller
) -> dict[str, Any]:
    fields = received.fields
    harvest = _harvest_values(fields)
    if len(received.files) == 1 and next(iter(received.files)).lower().endswith(
        sae_registry.ARCHIVE_SUFFIXES
    ):
        source = next(iter(received.files.values()))
    else:
        archives = [n for n in received.files if n.lower().endswith(sae_registry.ARCHIVE_SUFFIXES)]
        if archives:
            raise Unprocessable(
                f"Send either one archive or the folder's files, not both ({archives[0]!r} with other files)."
            )
        source = received.folder
    options = sae_registry.UploadOptions(
        slug=fields.get("slug") or None,
        model_name=fields.get("model_name") or None,
        hook_name=fields.get("hook_name") or None,
        uploader=caller.name,
    )
    if harvest is not None:  # refuse a bad harvest request before storing anything
        harvest_jobs.harvest_params(settings, harvest)
    sae, warnings = sae_registry.register_checkpoint(session, settings, source, options)
    out = features.sae_dict(session, sae)
    out["warnings"] = warnings
    out["job"] = None
    if harvest is not None:
        job = harvest_jobs.start_harvest(session, settings, sae, harvest)
        out["job"] = job_dict(session, job)
        out["harvest_status"] = "pending"
    return out


@router.post(
    "/saes",
    status_code=status.HTTP_201_CREATED,
    response_model=SAEUploaded,
    summary="Upload a checkpoint",
    openapi_extra=UPLOAD_OPENAPI,
)
async def upload_sae(
    request: Request, session: SessionDep, settings: SettingsDep, caller: UploaderDep
) -> dict[str, Any]:
    """Multipart: the checkpoint folder's files as ``files`` parts (cfg.json,
    sae_weights.safetensors, ...; or sae.safetensors for sparsify, ae.pt + config.json for
    dictionary_learning), or one .zip / .tar.gz of the folder. Optional fields: ``slug``,
    ``model_name`` / ``hook_name`` (override the checkpoint's), ``harvest`` and
    ``harvest_corpus`` / ``harvest_tokens`` / ``harvest_ctx_len`` / ``harvest_examples`` to
    start a harvest job. The checkpoint is validated completely before anything is stored."""
    # End the key check's transaction before the (possibly long) upload streams in, so no
    # lock is held meanwhile; registering opens a new one.
    await run_in_threadpool(tx.commit, session)
    received = await receive_upload(
        request, sae_registry.tmp_root(settings), settings.max_upload_bytes
    )
    try:
        return await run_in_threadpool(_register, session, settings, received, caller)
    finally:
        await run_in_threadpool(received.remove)
