"""Per-unit statistics: the harvest's bulk write and the pages' lists, grids and lookups.

Every read goes through the SAE's active harvest unless a harvest id is given, and every
list is index-backed: ``(harvest_id, unit_kind, frequency|max_value)`` for the sorts,
the primary key ``(harvest_id, unit_kind, unit_index)`` for index order, head ranges and
lookups. The harvester writes one row per unit, dead units (``n_active = 0``) included.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..codec import pack_i64
from ..models import Explanation, Sae, UnitKind, UnitStats
from ._bulk import bulk_insert
from ._common import Page, chunked, units_clause, units_params
from .explanations import matching_units

SortKey = Literal["index", "frequency", "max_value"]
_STATS_COLUMNS = [c.name for c in UnitStats.__table__.columns]

BRIEF_COLUMNS = (
    UnitStats.harvest_id,
    UnitStats.unit_kind,
    UnitStats.unit_index,
    UnitStats.n_active,
    UnitStats.frequency,
    UnitStats.mean_value,
    UnitStats.max_value,
    UnitStats.both_parents_active,
    UnitStats.kept_count,
)
"""What lists, grids and summaries show: the scalar statistics, without the histogram,
logit effects and neighbours (JSON and bytes that would be decoded for every row)."""

UnitBrief = sa.Row[*tuple[Any, ...]]
"""A row of ``BRIEF_COLUMNS``, read by attribute (``row.frequency``) like a ``UnitStats``."""


def add_stats(session: Session, harvest_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
    """Bulk-write stats rows (column name -> value; ``histogram`` may be an array of counts,
    packed here as int64). Missing optional columns are NULL."""

    def _row(row: Mapping[str, Any]) -> dict[str, Any]:
        out = {c: row.get(c) for c in _STATS_COLUMNS}
        out["harvest_id"] = harvest_id
        hist = out["histogram"]
        if hist is not None and not isinstance(hist, bytes):
            out["histogram"] = pack_i64(hist)
        return out

    return bulk_insert(session, UnitStats, (_row(r) for r in rows), columns=_STATS_COLUMNS)


def head_range(sae: Sae, unit_kind: int, head: int) -> range:
    """Flat indices of head ``head`` for this unit kind (KronSAE only)."""
    if not sae.is_kronsae:
        raise ValueError(f"{sae.slug} is not a KronSAE: it has no heads")
    assert sae.h and sae.m and sae.n
    if not 0 <= head < sae.h:
        raise ValueError(f"head must be in 0..{sae.h - 1}, got {head}")
    size = {UnitKind.LATENT: sae.m * sae.n, UnitKind.BASE: sae.m, UnitKind.EXTENSION: sae.n}[
        UnitKind(unit_kind)
    ]
    return range(head * size, (head + 1) * size)


def _hid(sae: Sae, harvest_id: int | None) -> int | None:
    return sae.active_harvest_id if harvest_id is None else harvest_id


def _stat_filters(
    sae: Sae,
    hid: int,
    kind: int,
    min_frequency: float | None,
    max_frequency: float | None,
    head: int | None,
) -> list[Any]:
    where: list[Any] = [UnitStats.harvest_id == hid, UnitStats.unit_kind == kind]
    if min_frequency is not None:
        where.append(UnitStats.frequency >= min_frequency)
    if max_frequency is not None:
        where.append(UnitStats.frequency <= max_frequency)
    if head is not None:
        r = head_range(sae, kind, head)
        where.append(UnitStats.unit_index.between(r.start, r.stop - 1))
    return where


def count_units(
    session: Session,
    sae: Sae,
    *,
    unit_kind: int = UnitKind.LATENT,
    min_frequency: float | None = None,
    max_frequency: float | None = None,
    head: int | None = None,
    harvest_id: int | None = None,
) -> int:
    """How many units ``list_units`` would list with these filters."""
    hid = _hid(sae, harvest_id)
    if hid is None:
        return 0
    where = _stat_filters(sae, hid, int(UnitKind(unit_kind)), min_frequency, max_frequency, head)
    return session.scalar(sa.select(sa.func.count()).select_from(UnitStats).where(*where)) or 0


def list_units(
    session: Session,
    sae: Sae,
    *,
    unit_kind: int = UnitKind.LATENT,
    sort: SortKey = "index",
    descending: bool = False,
    min_frequency: float | None = None,
    max_frequency: float | None = None,
    head: int | None = None,
    has_explanation: bool | None = None,
    q: str | None = None,
    limit: int = 50,
    offset: int = 0,
    harvest_id: int | None = None,
    total: int | None = None,
) -> Page[UnitBrief]:
    """Browse a harvest's units: sort, filter (frequency range inclusive, head, explained or
    not, full-text over explanations), paginate; ``total`` counts all matches (pass it to
    skip the count when the caller knows it). Items are ``BRIEF_COLUMNS`` rows.

    The page's indices are found first, from the index alone (the sort indexes end with
    ``unit_index``, so the walk to ``offset`` reads no table rows), and only its rows are
    then read, by primary key: the plain ``ORDER BY ... OFFSET`` made PostgreSQL read and
    sort every unit on each page. Two statements, not a join: a join to the page was
    planned as a nested loop over every unit right after a bulk load (no statistics yet),
    minutes per page at F = 65,536."""
    hid = _hid(sae, harvest_id)
    if hid is None:
        return Page([], 0)
    kind = int(UnitKind(unit_kind))
    where = _stat_filters(sae, hid, kind, min_frequency, max_frequency, head)
    if has_explanation is not None:
        # Driven from the (few) explanations, not probed once per unit.
        explained = sa.select(Explanation.unit_index).where(
            Explanation.sae_id == sae.id,
            Explanation.unit_kind == kind,
            Explanation.deleted_at.is_(None),
        )
        column = UnitStats.unit_index
        where.append(column.in_(explained) if has_explanation else column.not_in(explained))
    if q is not None and q.strip():
        matches = matching_units(session, sae.id, kind, q)
        if matches is None:
            return Page([], 0)
        where.append(UnitStats.unit_index.in_(matches))

    key = {
        "index": None,
        "frequency": UnitStats.frequency,
        "max_value": UnitStats.max_value,
    }[sort]
    index_order = (
        UnitStats.unit_index.desc() if descending and key is None else UnitStats.unit_index
    )
    order = [index_order] if key is None else [key.desc() if descending else key, index_order]
    page = list(
        session.scalars(
            sa.select(UnitStats.unit_index)
            .where(*where)
            .order_by(*order)
            .limit(limit)
            .offset(offset)
        )
    )
    items: list[UnitBrief] = []
    if page:
        params = {"harvest_id": hid, f"units_{kind}": page}
        found = {row.unit_index: row for row in session.execute(_briefs_select((kind,)), params)}
        items = [found[i] for i in page if i in found]
    if total is None:
        count = sa.select(sa.func.count()).select_from(UnitStats).where(*where)
        total = session.scalar(count) or 0
    return Page(items, total)


def get_unit_stats(
    session: Session, sae: Sae, unit_kind: int, unit_index: int, *, harvest_id: int | None = None
) -> UnitStats | None:
    hid = _hid(sae, harvest_id)
    if hid is None:
        return None
    return session.get(UnitStats, (hid, int(UnitKind(unit_kind)), unit_index))


def stats_for_units(
    session: Session,
    sae: Sae,
    unit_kind: int,
    unit_indices: Iterable[int],
    *,
    harvest_id: int | None = None,
) -> dict[int, UnitStats]:
    """Stats of a set of units (row/column siblings, parents, neighbours), by index."""
    hid = _hid(sae, harvest_id)
    if hid is None:
        return {}
    kind = int(UnitKind(unit_kind))
    out: dict[int, UnitStats] = {}
    for chunk in chunked(sorted({int(i) for i in unit_indices})):
        for row in session.scalars(
            sa.select(UnitStats).where(
                UnitStats.harvest_id == hid,
                UnitStats.unit_kind == kind,
                UnitStats.unit_index.in_(chunk),
            )
        ):
            out[row.unit_index] = row
    return out


@functools.cache
def _briefs_select(kinds: tuple[int, ...]) -> sa.Select[*tuple[Any, ...]]:
    return sa.select(*BRIEF_COLUMNS).where(
        UnitStats.harvest_id == sa.bindparam("harvest_id"),
        units_clause(UnitStats.unit_kind, UnitStats.unit_index, kinds),
    )


def unit_briefs(
    session: Session,
    sae: Sae,
    units: Iterable[tuple[int, int]],
    *,
    harvest_id: int | None = None,
) -> dict[tuple[int, int], UnitBrief]:
    """``BRIEF_COLUMNS`` of units of any kinds, ``(unit_kind, unit_index)``, in one query
    per thousand units (a latent's siblings, parents and neighbours together)."""
    hid = _hid(sae, harvest_id)
    if hid is None:
        return {}
    keys = sorted({(int(UnitKind(k)), int(i)) for k, i in units})
    out: dict[tuple[int, int], UnitBrief] = {}
    for chunk in chunked(keys):
        kinds, params = units_params(chunk)
        for row in session.execute(_briefs_select(kinds), {"harvest_id": hid, **params}):
            out[(row.unit_kind, row.unit_index)] = row
    return out


def head_grid(
    session: Session, sae: Sae, head: int, *, harvest_id: int | None = None
) -> list[UnitBrief]:
    """``BRIEF_COLUMNS`` of the m*n latents of one head in index order (row i, column j at
    i*n + j)."""
    hid = _hid(sae, harvest_id)
    if hid is None:
        return []
    r = head_range(sae, UnitKind.LATENT, head)
    return list(
        session.execute(
            sa.select(*BRIEF_COLUMNS)
            .where(
                UnitStats.harvest_id == hid,
                UnitStats.unit_kind == int(UnitKind.LATENT),
                UnitStats.unit_index.between(r.start, r.stop - 1),
            )
            .order_by(UnitStats.unit_index)
        )
    )
