"""SAEs: create, look up, list, delete (the database cascades to everything they own)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..errors import Conflict, NotFound
from ..models import Sae
from ._common import Page


def create_sae(
    session: Session,
    *,
    slug: str,
    architecture: str,
    d_in: int,
    d_sae: int,
    file_hash: str,
    storage_path: str,
    cfg: dict[str, Any] | None = None,
    k: int | None = None,
    h: int | None = None,
    m: int | None = None,
    n: int | None = None,
    composition: str | None = None,
    dtype: str = "float32",
    model_name: str | None = None,
    hook_name: str | None = None,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Sae:
    """Add an SAE. Raises ``Conflict`` (with ``existing_id``) for a taken slug or a
    checkpoint already uploaded (same ``file_hash``)."""
    existing = get_sae_by_hash(session, file_hash)
    if existing is not None:
        raise Conflict(
            f"this checkpoint is already uploaded as {existing.slug!r}", existing_id=existing.id
        )
    existing = get_sae_by_slug(session, slug)
    if existing is not None:
        raise Conflict(f"the slug {slug!r} is taken", existing_id=existing.id)
    sae = Sae(
        slug=slug,
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        h=h,
        m=m,
        n=n,
        composition=composition,
        dtype=dtype,
        model_name=model_name,
        hook_name=hook_name,
        cfg=cfg or {},
        metrics=metrics or {},
        provenance=provenance or {},
        file_hash=file_hash,
        storage_path=storage_path,
        active_harvest_id=None,
    )
    try:
        with session.begin_nested():  # a concurrent upload may win the race: report it cleanly
            session.add(sae)
    except sa.exc.IntegrityError as exc:
        raise Conflict(f"an SAE with slug {slug!r} or this checkpoint already exists") from exc
    return sae


def get_sae(session: Session, sae_id: int) -> Sae | None:
    return session.get(Sae, sae_id)


_BY_SLUG = sa.select(Sae).where(Sae.slug == sa.bindparam("slug"))  # every request: built once


def get_sae_by_slug(session: Session, slug: str) -> Sae | None:
    return session.scalars(_BY_SLUG, {"slug": slug}).one_or_none()


def get_sae_by_hash(session: Session, file_hash: str) -> Sae | None:
    return session.scalars(sa.select(Sae).where(Sae.file_hash == file_hash)).one_or_none()


def require_sae(session: Session, slug: str) -> Sae:
    sae = get_sae_by_slug(session, slug)
    if sae is None:
        raise NotFound(f"no SAE named {slug!r}")
    return sae


def list_saes(session: Session, *, limit: int = 100, offset: int = 0) -> Page[Sae]:
    items = list(
        session.scalars(sa.select(Sae).order_by(Sae.created_at, Sae.id).limit(limit).offset(offset))
    )
    total = session.scalar(sa.select(sa.func.count()).select_from(Sae)) or 0
    return Page(items, total)


def update_sae_metrics(session: Session, sae: Sae, metrics: dict[str, Any]) -> Sae:
    sae.metrics = {**(sae.metrics or {}), **metrics}
    session.flush()
    return sae


def delete_sae(session: Session, sae: Sae) -> None:
    """Delete the SAE with its harvests, contexts, examples, stats and explanations.

    The foreign keys cascade in the database (one statement, no rows loaded); jobs keep
    their history with ``sae_id`` set to NULL. Files under ``storage_path`` are the
    caller's to remove.
    """
    session.flush()
    # Break the sae <-> harvest cycle first, so no database has to untangle it mid-cascade.
    session.execute(sa.update(Sae).where(Sae.id == sae.id).values(active_harvest_id=None))
    session.execute(sa.delete(Sae).where(Sae.id == sae.id))
    if sae in session:
        session.expunge(sae)
