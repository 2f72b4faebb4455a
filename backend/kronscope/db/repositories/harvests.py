"""Harvest lifecycle: create, run, checkpoint, complete (atomic flip), fail, clean up.

Visibility: everything a harvest writes (tokens, contexts, examples, stats) is keyed by
its id and unseen by pages, which read only through ``sae.active_harvest_id``.
``mark_complete`` sets the harvest complete and flips that pointer in the same
transaction, so a harvest appears all at once. An interrupted harvest keeps its rows and
its ``checkpoint`` JSON and can resume, or ``delete_partial_data`` and start over.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..base import utcnow
from ..errors import Conflict, NotFound
from ..models import Context, Example, Harvest, HarvestStatus, Sae, Token, UnitStats


def create_harvest(
    session: Session,
    sae_id: int,
    *,
    corpus_name: str,
    n_tokens: int,
    ctx_len: int,
    params: dict[str, Any] | None = None,
    corpus_description: str | None = None,
    corpus_hash: str | None = None,
) -> Harvest:
    harvest = Harvest(
        sae_id=sae_id,
        status=HarvestStatus.PENDING.value,
        corpus_name=corpus_name,
        corpus_description=corpus_description,
        corpus_hash=corpus_hash,
        n_tokens=n_tokens,
        tokens_seen=0,
        ctx_len=ctx_len,
        params=params or {},
    )
    session.add(harvest)
    session.flush()
    return harvest


def get_harvest(session: Session, harvest_id: int) -> Harvest | None:
    return session.get(Harvest, harvest_id)


def _require(session: Session, harvest_id: int) -> Harvest:
    harvest = session.get(Harvest, harvest_id)
    if harvest is None:
        raise NotFound(f"no harvest {harvest_id}")
    return harvest


def list_harvests(session: Session, sae_id: int) -> list[Harvest]:
    return list(
        session.scalars(
            sa.select(Harvest).where(Harvest.sae_id == sae_id).order_by(Harvest.id.desc())
        )
    )


def get_active_harvest(session: Session, sae_id: int) -> Harvest | None:
    """The complete harvest pages show for this SAE, if any."""
    return session.scalars(
        sa.select(Harvest).join(Sae, Sae.active_harvest_id == Harvest.id).where(Sae.id == sae_id)
    ).one_or_none()


def mark_running(session: Session, harvest_id: int) -> Harvest:
    """Pending (or an interrupted run being resumed) -> running."""
    harvest = _require(session, harvest_id)
    if harvest.status == HarvestStatus.COMPLETE:
        raise Conflict(f"harvest {harvest_id} is already complete")
    harvest.status = HarvestStatus.RUNNING.value
    harvest.error = None
    harvest.finished_at = None
    if harvest.started_at is None:
        harvest.started_at = utcnow()
    session.flush()
    return harvest


def save_checkpoint(
    session: Session,
    harvest_id: int,
    checkpoint: dict[str, Any],
    *,
    tokens_seen: int | None = None,
) -> None:
    """Record resume state (JSON) and progress. Commit it with the rows it describes."""
    values: dict[str, Any] = {"checkpoint": checkpoint, "updated_at": utcnow()}
    if tokens_seen is not None:
        values["tokens_seen"] = tokens_seen
    session.execute(sa.update(Harvest).where(Harvest.id == harvest_id).values(**values))


def mark_complete(
    session: Session, harvest_id: int, *, tokens_seen: int | None = None
) -> int | None:
    """Complete the harvest and make it the SAE's active one, in this transaction.

    Returns the previously active harvest id (still stored; delete it if unwanted).
    """
    harvest = _require(session, harvest_id)
    if harvest.status not in (HarvestStatus.RUNNING, HarvestStatus.PENDING):
        raise Conflict(f"harvest {harvest_id} is {harvest.status}, not running")
    sae = session.get(Sae, harvest.sae_id, with_for_update=True, populate_existing=True)
    assert sae is not None  # the foreign key guarantees it
    previous = sae.active_harvest_id
    harvest.status = HarvestStatus.COMPLETE.value
    harvest.finished_at = utcnow()
    harvest.checkpoint = None
    if tokens_seen is not None:
        harvest.tokens_seen = tokens_seen
    # The one UPDATE that makes the new data visible, committed with the status change.
    sae.active_harvest_id = harvest.id
    session.flush()
    return previous if previous != harvest.id else None


def _finish(session: Session, harvest_id: int, status: HarvestStatus, error: str | None) -> Harvest:
    harvest = _require(session, harvest_id)
    if harvest.status == HarvestStatus.COMPLETE:
        raise Conflict(f"harvest {harvest_id} is complete; delete it instead")
    harvest.status = status.value
    harvest.error = error
    harvest.finished_at = utcnow()
    session.flush()
    return harvest


def mark_failed(session: Session, harvest_id: int, error: str) -> Harvest:
    """Failed; its rows and checkpoint stay so that it can resume."""
    return _finish(session, harvest_id, HarvestStatus.FAILED, error)


def mark_cancelled(session: Session, harvest_id: int) -> Harvest:
    return _finish(session, harvest_id, HarvestStatus.CANCELLED, None)


def delete_partial_data(session: Session, harvest_id: int) -> None:
    """Remove everything a (not active) harvest wrote, to start it over.

    Examples go first so that deleting contexts finds nothing left to cascade to.
    """
    active = session.scalar(sa.select(Sae.id).where(Sae.active_harvest_id == harvest_id))
    if active is not None:
        raise Conflict(f"harvest {harvest_id} is the active harvest; its data is in use")
    for model in (Example, UnitStats, Context, Token):
        session.execute(
            sa.delete(model)
            .where(model.harvest_id == harvest_id)
            .execution_options(synchronize_session=False)
        )
    session.execute(
        sa.update(Harvest)
        .where(Harvest.id == harvest_id)
        .values(checkpoint=None, tokens_seen=0, updated_at=utcnow())
    )


def delete_harvest(session: Session, harvest_id: int) -> None:
    """Delete a harvest and its data; if it was active the SAE shows no harvest."""
    session.flush()
    session.execute(
        sa.update(Sae)
        .where(Sae.active_harvest_id == harvest_id)
        .values(active_harvest_id=None)
        .execution_options(synchronize_session="fetch")
    )
    for model in (Example, UnitStats, Context, Token):
        session.execute(
            sa.delete(model)
            .where(model.harvest_id == harvest_id)
            .execution_options(synchronize_session=False)
        )
    session.execute(sa.delete(Harvest).where(Harvest.id == harvest_id))
