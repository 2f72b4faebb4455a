"""The SAE registry: validate an uploaded checkpoint, store it natively, list, delete.

Order of an upload, so that nothing is stored on any failure:

1. the checkpoint (a folder of files, or one archive) is read and validated completely by
   ``sae.checkpoint.load_checkpoint`` (shapes, dtypes, finiteness, cfg consistency);
2. its content hash is looked up: the same checkpoint already uploaded is a 409 naming
   the existing slug;
3. the subject model must resolve by name (packaged models, ``models_dir``; never a path,
   never remote code) and a hook must be named;
4. the native files are written to a temporary folder beside ``data_dir/saes/<slug>`` and
   renamed into place (atomic), then the row is added and flushed;
5. if the transaction rolls back later, the stored folder is removed again (``tx``).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ..config import Settings
from ..db import errors as db_errors
from ..db.models import Harvest, Sae
from ..db.repositories import harvests as harvest_repo
from ..db.repositories import saes as sae_repo
from ..lm import ModelNotFoundError, resolve_model
from ..sae import SAEError
from ..sae.archive import ARCHIVE_SUFFIXES
from ..sae.checkpoint import LoadedCheckpoint, load_checkpoint, save
from ..sae.importers import KNOWN_FILES
from . import tx
from .errors import Conflict, NotFound, Unprocessable

log = logging.getLogger(__name__)

CHECKPOINT_FILES: tuple[str, ...] = tuple(KNOWN_FILES)
"""File names an uploaded checkpoint folder may hold."""
__all__ = ["ARCHIVE_SUFFIXES", "CHECKPOINT_FILES"]

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
SAES_DIR = "saes"
TMP_DIR = "tmp"


def tmp_root(settings: Settings) -> Path:
    """Where uploads are received and archives extracted (inside ``data_dir``)."""
    return settings.data_dir / TMP_DIR


def sae_folder(settings: Settings, sae: Sae) -> Path:
    return settings.data_dir / sae.storage_path


def validate_slug(slug: str) -> str:
    slug = slug.strip()
    if not SLUG_RE.match(slug):
        raise Unprocessable(
            f"The slug {slug!r} is not valid: use 1 to 100 lowercase letters, digits, '.', '-' "
            "or '_', starting with a letter or digit.",
            detail={"field": "slug"},
        )
    return slug


def _slugify(text: str) -> str:
    text = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return re.sub(r"-{2,}", "-", text)


def derive_slug(
    session: Session, cfg_model: str | None, hook: str | None, arch: str, d_sae: int
) -> str:
    """``<model>-<hook>-<architecture>-<F>``, made unique with a numeric suffix."""
    parts = [p for p in (cfg_model, hook, arch, str(d_sae)) if p]
    base = _slugify("-".join(parts))[:90] or "sae"
    if not base[0].isalnum():
        base = "sae-" + base
    slug, n = base, 2
    while sae_repo.get_sae_by_slug(session, slug) is not None:
        slug, n = f"{base}-{n}", n + 1
    return slug


@dataclass(frozen=True)
class UploadOptions:
    slug: str | None = None
    model_name: str | None = None
    hook_name: str | None = None
    uploader: str | None = None


def validate_checkpoint(path: Path, settings: Settings) -> LoadedCheckpoint:
    """Load and validate any supported checkpoint layout; 422 naming the problem."""
    try:
        return load_checkpoint(
            path,
            device="cpu",
            max_bytes=max(settings.max_upload_bytes * 4, 64 * 1024**2),  # extracted size
            tmp_dir=tmp_root(settings),
        )
    except SAEError as exc:
        raise Unprocessable(
            f"The checkpoint is not valid: {exc}", detail=_sae_error_detail(exc)
        ) from exc
    except (OSError, RuntimeError) as exc:  # truncated or unreadable files
        raise Unprocessable(f"The checkpoint cannot be read: {exc}") from exc


def _sae_error_detail(exc: Exception) -> dict[str, Any]:
    detail: dict[str, Any] = {}
    for key in ("file", "field"):
        value = getattr(exc, key, None)
        if value:
            detail[key] = value
    return detail


def check_model(settings: Settings, model_name: str | None, hook_name: str | None) -> None:
    if not model_name:
        raise Unprocessable(
            "The checkpoint does not say which model it reads (metadata.model_name in cfg.json); "
            "send the form field 'model_name'.",
            detail={"field": "model_name"},
        )
    if not hook_name:
        raise Unprocessable(
            "The checkpoint does not say where it reads activations (metadata.hook_name in "
            "cfg.json); send the form field 'hook_name'.",
            detail={"field": "hook_name"},
        )
    try:
        resolve_model(model_name, settings, allow_paths=False)
    except ModelNotFoundError as exc:
        raise Unprocessable(
            f"The subject model is not available on this server: {exc}",
            detail={"field": "model_name", "model_name": model_name},
        ) from exc


def register_checkpoint(
    session: Session, settings: Settings, source: Path, options: UploadOptions
) -> tuple[Sae, list[str]]:
    """Validate ``source`` (folder or archive), store it natively and add the SAE row.

    Returns the row (flushed) and the loader's warnings. Raises 422 / 409 before anything
    is written."""
    slug = validate_slug(options.slug) if options.slug else None
    loaded = validate_checkpoint(source, settings)
    cfg = loaded.cfg

    existing = sae_repo.get_sae_by_hash(session, loaded.sha256)
    if existing is not None:
        raise Conflict(
            f"This checkpoint is already uploaded as {existing.slug!r}.",
            detail={"existing_slug": existing.slug, "file_hash": loaded.sha256},
        )
    model_name = (options.model_name or "").strip() or cfg.model_name
    hook_name = (options.hook_name or "").strip() or cfg.hook_name
    for field, value in (("model_name", model_name), ("hook_name", hook_name)):
        if value is not None and not isinstance(value, str):
            raise Unprocessable(
                f"cfg.json gives {field} as {type(value).__name__} {value!r}; it must be text.",
                detail={"field": field},
            )
    if len(model_name or "") > 512 or len(hook_name or "") > 512:
        raise Unprocessable("model_name and hook_name may have at most 512 characters.")
    check_model(settings, model_name, hook_name)
    cfg.metadata["model_name"] = model_name
    cfg.metadata["hook_name"] = hook_name

    if slug is None:
        slug = derive_slug(session, model_name, hook_name, cfg.architecture, cfg.d_sae)
    elif sae_repo.get_sae_by_slug(session, slug) is not None:
        raise Conflict(f"The slug {slug!r} is taken; choose another.", detail={"slug": slug})

    rel = f"{SAES_DIR}/{slug}"
    target = settings.data_dir / rel
    if target.exists():  # left over from an SAE whose delete did not finish: not ours to reuse
        raise Conflict(
            f"The storage folder for {slug!r} already exists; choose another slug.",
            detail={"slug": slug},
        )
    try:
        save(loaded.sae, target, sparsity=loaded.sparsity)
    except FileExistsError as exc:  # a concurrent upload took this slug a moment ago
        raise Conflict(
            f"The slug {slug!r} was just taken; try again.", detail={"slug": slug}
        ) from exc
    except (SAEError, OSError) as exc:
        raise Unprocessable(f"The checkpoint could not be stored: {exc}") from exc
    tx.on_rollback(session, lambda: shutil.rmtree(target, ignore_errors=True))

    metrics = cfg.metadata.get("metrics")
    try:
        sae = sae_repo.create_sae(
            session,
            slug=slug,
            architecture=cfg.architecture,
            d_in=cfg.d_in,
            d_sae=cfg.d_sae,
            file_hash=loaded.sha256,
            storage_path=rel,
            cfg=cfg.to_dict(),
            k=cfg.k,
            h=cfg.h,
            m=cfg.m,
            n=cfg.n,
            composition=cfg.composition if cfg.architecture == "kronsae" else None,
            dtype=cfg.dtype,
            model_name=model_name,
            hook_name=hook_name,
            metrics=metrics if isinstance(metrics, dict) else {},
            provenance={
                "source_format": loaded.source_format,
                "files": loaded.files,
                "uploaded_by": options.uploader,
                "warnings": loaded.warnings,
            },
        )
    except db_errors.Conflict as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise Conflict(str(exc)[:1].upper() + str(exc)[1:] + ".") from exc
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return sae, list(loaded.warnings)


def get_sae(session: Session, slug: str) -> Sae:
    sae = sae_repo.get_sae_by_slug(session, slug)
    if sae is None:
        raise NotFound(f"There is no SAE named {slug!r}.", detail={"sae": slug})
    return sae


def delete_sae(session: Session, settings: Settings, slug: str) -> None:
    """Delete the SAE's rows (the database cascades) and, once committed, its files."""
    sae = get_sae(session, slug)
    folder = sae_folder(settings, sae)
    root = (settings.data_dir / SAES_DIR).resolve()
    sae_repo.delete_sae(session, sae)
    session.flush()
    if folder.resolve().parent == root:  # never remove anything outside data_dir/saes
        tx.on_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))


def harvest_summary(session: Session, sae: Sae) -> tuple[str, Harvest | None, Harvest | None]:
    """``(status, active harvest, newest harvest)``; status is ``none`` when never harvested,
    else the newest harvest's status."""
    harvests = harvest_repo.list_harvests(session, sae.id)
    newest = harvests[0] if harvests else None
    active = next((h for h in harvests if h.id == sae.active_harvest_id), None)
    return (newest.status if newest else "none"), active, newest
