"""Harvest jobs: start one (from the API or an upload) and run it (in the job runner).

A corpus is named, never given as a path: ``builtin`` (the Python docs shipped with the
interpreter) or the name of a file or folder under ``data_dir/corpora``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ..config import Settings
from ..db.models import Job, JobKind, JobStatus, Sae
from ..db.repositories import jobs as job_repo
from ..lm.corpus import BUILTIN_NAMES
from ..lm.resolve import is_plain_name
from .errors import Conflict, Unprocessable
from .jobs import JobContext, JobFailed

CORPORA_DIR = "corpora"

DEFAULTS: dict[str, Any] = {
    "corpus": "builtin",
    "tokens": 200_000,
    "ctx_len": 64,
    "examples_per_latent": 20,
    "samples_per_latent": 20,
    "batch_size": None,
    "seed": 0,
}


def corpora_dir(settings: Settings) -> Path:
    return settings.data_dir / CORPORA_DIR


def available_corpora(settings: Settings) -> list[str]:
    folder = corpora_dir(settings)
    names = [*BUILTIN_NAMES[:1]]
    if folder.is_dir():
        names += sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    return names


def resolve_corpus(settings: Settings, name: str) -> str | Path:
    """The corpus spec for ``load_corpus``; 422 for names the server does not know."""
    name = name.strip()
    if name.lower() in BUILTIN_NAMES:
        return name.lower()
    base, _, field = name.partition(":")
    if is_plain_name(base):
        path = corpora_dir(settings) / base
        if path.exists() and not path.is_symlink():
            return f"{path}:{field}" if field else path
    raise Unprocessable(
        f"Unknown corpus {name!r}: use one of {', '.join(available_corpora(settings))} "
        f"(corpora are files or folders in {corpora_dir(settings)}).",
        detail={"field": "corpus", "available": available_corpora(settings)},
    )


def harvest_params(settings: Settings, values: dict[str, Any]) -> dict[str, Any]:
    params = {**DEFAULTS, **{k: v for k, v in values.items() if v is not None}}
    resolve_corpus(settings, str(params["corpus"]))  # validate now, resolve again when run
    if params["ctx_len"] < 2:
        raise Unprocessable("ctx_len must be at least 2 tokens.", detail={"field": "ctx_len"})
    return params


def start_harvest(session: Session, settings: Settings, sae: Sae, values: dict[str, Any]) -> Job:
    """Queue a harvest job for ``sae``; 409 when one is already queued or running."""
    params = harvest_params(settings, values)
    busy = [
        j
        for status in (JobStatus.QUEUED, JobStatus.RUNNING)
        for j in job_repo.list_jobs(session, status=status.value, sae_id=sae.id, limit=100).items
        if j.kind == JobKind.HARVEST
    ]
    if busy:
        raise Conflict(
            f"A harvest of {sae.slug!r} is already {busy[0].status} (job {busy[0].id}).",
            detail={"job": busy[0].id},
        )
    total = math.ceil(params["tokens"] / params["ctx_len"]) * params["ctx_len"]
    return job_repo.create_job(
        session, JobKind.HARVEST.value, params=params, sae_id=sae.id, progress_total=total
    )


def run_harvest_job(ctx: JobContext) -> str | None:
    """The job runner's handler for ``harvest`` jobs: load the stored checkpoint, the
    subject model (by name, as at upload) and the corpus, cut the contexts and run
    ``kronscope.harvest.run_harvest``. Its state is saved under ``data_dir/harvests``, so a
    job requeued after a crash or a shutdown resumes where it stopped."""
    from ..config import resolve_device
    from ..db.repositories import saes as sae_repo
    from ..harvest import HarvestError, HarvestParams
    from ..harvest.runner import HarvestProgress, run_harvest
    from ..lm import (
        CorpusError,
        HookError,
        ModelNotFoundError,
        load_corpus,
        load_model,
        make_contexts,
    )
    from ..sae import SAEError
    from ..sae.checkpoint import load_checkpoint

    settings = ctx.settings
    params = {**DEFAULTS, **ctx.params}
    with ctx.session_factory() as s:
        sae_row = sae_repo.get_sae(s, ctx.sae_id) if ctx.sae_id is not None else None
        if sae_row is None:
            raise JobFailed("the SAE of this job no longer exists")
        slug, storage = sae_row.slug, sae_row.storage_path
        model_name, hook_name = sae_row.model_name, sae_row.hook_name
        prepend_bos = (sae_row.cfg or {}).get("metadata", {}).get("prepend_bos", True)
    if not model_name or not hook_name:
        raise JobFailed(f"{slug} has no model name or hook name to harvest with")
    try:
        ctx.progress(0, None, "loading the checkpoint")
        device = resolve_device(settings.device)
        sae = load_checkpoint(settings.data_dir / storage, device=device).sae
        ctx.progress(0, None, f"loading the model {model_name}")
        model = load_model(model_name, settings=settings)
        ctx.progress(0, None, f"reading the corpus {params['corpus']}")
        corpus = load_corpus(resolve_corpus(settings, str(params["corpus"])))
        ctx_len = int(params["ctx_len"])
        contexts = make_contexts(
            corpus,
            model,
            ctx_len,
            seed=int(params["seed"]),
            max_contexts=max(1, math.ceil(int(params["tokens"]) / ctx_len)),
            prepend_bos=bool(prepend_bos),
        )
        hp_values: dict[str, Any] = {
            "examples": int(params["examples_per_latent"]),
            "samples": max(1, int(params["samples_per_latent"])),
            "seed": int(params["seed"]),
        }
        if params.get("batch_size"):
            hp_values["batch_size"] = int(params["batch_size"])
        hp = HarvestParams(**hp_values)
    except Unprocessable as exc:
        raise JobFailed(exc.message) from exc
    except (SAEError, ModelNotFoundError, HookError, CorpusError, ValueError, OSError) as exc:
        raise JobFailed(str(exc)) from exc

    def progress(p: HarvestProgress) -> None:
        if p.phase == "write":
            ctx.progress(ctx.done, None, "writing the harvest to the database")
        else:
            ctx.progress(p.done, p.total, "harvesting")

    try:
        harvest_id = run_harvest(
            ctx.session_factory,
            slug,
            sae,
            model,
            contexts,
            hp,
            corpus=corpus,
            hook_name=hook_name,
            progress=progress,
            work_dir=settings.data_dir / "harvests",
            resume=True,
        )
    except HarvestError as exc:
        raise JobFailed(str(exc)) from exc
    ctx.set_harvest(harvest_id)
    return (
        f"harvest {harvest_id} of {slug} is complete: {len(contexts)} contexts of {ctx_len} tokens"
    )
