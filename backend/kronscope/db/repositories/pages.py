"""The feature pages' reads, on the driver's connection (``db.raw``): an SAE by slug with
its active harvest and largest explanation change number, a unit's page (the SAE's row, the
unit's full statistics and its examples with their contexts, in one statement), every
unit's summary, explanations of a set of units, an SAE's explanations changed since a
change number, a harvest's token strings.

Each is one statement with a fixed shape, so both databases keep it prepared. Rows come
back as tuples (or the small records below); the services turn them into pages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..models import UnitKind
from ..raw import RawQuery, RawReader, json_value, utc


@dataclass(frozen=True)
class SaeRef:
    """What the pages need of an SAE row, with its active harvest's identity."""

    id: int
    slug: str
    architecture: str
    d_in: int
    d_sae: int
    k: int | None
    h: int | None
    m: int | None
    n: int | None
    composition: str | None
    active_harvest_id: int | None
    harvest_finished_at: datetime | None
    """When the active harvest completed (with its id, what identifies its data)."""
    harvest_tokens_seen: int | None
    newest_harvest_status: str | None
    """Status of the SAE's newest harvest (None when it was never harvested)."""
    created_at: datetime | None = None
    """With the id, what identifies the SAE (SQLite may give a deleted SAE's id again)."""

    @property
    def is_kronsae(self) -> bool:
        return self.architecture == "kronsae" and bool(self.h and self.m and self.n)

    @property
    def harvest_status(self) -> str:
        """``complete`` when pages have a harvest to show, else the newest one's status."""
        if self.active_harvest_id is not None:
            return "complete"
        return self.newest_harvest_status or "none"


_SAE = """
SELECT s.id, s.slug, s.architecture, s.d_in, s.d_sae, s.k, s.h, s.m, s.n, s.composition,
       s.active_harvest_id, h.finished_at, h.tokens_seen,
       (SELECT n.status FROM harvest n WHERE n.sae_id = s.id ORDER BY n.id DESC LIMIT 1),
       s.created_at,
       (SELECT max(x.seq) FROM explanation x WHERE x.sae_id = s.id)
FROM sae s LEFT JOIN harvest h ON h.id = s.active_harvest_id
"""
_SAE_BY_SLUG = RawQuery(_SAE + " WHERE s.slug = :slug")


def _sae_ref(row: tuple[Any, ...] | None) -> SaeRef | None:
    if row is None:
        return None
    return SaeRef(*row[:11], utc(row[11]), row[12], row[13], utc(row[14]))  # type: ignore[call-arg]


Statement = tuple[RawQuery, dict[str, Any]]
"""A query and its parameters, for ``RawReader.batch``."""


def sae_by_slug_statement(slug: str) -> Statement:
    return _SAE_BY_SLUG, {"slug": slug}


def sae_from_rows(rows: list[tuple[Any, ...]]) -> SaeRef | None:
    return _sae_ref(rows[0] if rows else None)


def explanation_seq_from_rows(rows: list[tuple[Any, ...]]) -> int:
    """The SAE's largest explanation change number (``explanation.seq``; 0 without any)
    as the SAE statement read it."""
    return int(rows[0][15] or 0) if rows else 0


def sae_by_slug(reader: RawReader, slug: str) -> SaeRef | None:
    return _sae_ref(reader.one(_SAE_BY_SLUG, slug=slug))


def sae_and_seq_by_slug(reader: RawReader, slug: str) -> tuple[SaeRef | None, int]:
    """The SAE (None if there is none) and its largest explanation change number."""
    rows = reader.all(_SAE_BY_SLUG, slug=slug)
    return sae_from_rows(rows), explanation_seq_from_rows(rows)


@dataclass(frozen=True)
class UnitRow:
    """One unit's full statistics (JSON decoded; the histogram still packed)."""

    n_active: int
    frequency: float
    mean_value: float | None
    max_value: float
    histogram: bytes | None
    histogram_edges: list[float] | None
    both_parents_active: int | None
    kept_count: int | None
    logit_effects: dict[str, Any] | None
    neighbours: list[Any] | None


def unit_from_rows(rows: list[tuple[Any, ...]]) -> UnitRow | None:
    if not rows:
        return None
    row = rows[0]
    hist = row[4]
    return UnitRow(
        int(row[0]),
        row[1],
        row[2],
        row[3],
        bytes(hist) if hist is not None else None,
        json_value(row[5]),
        row[6],
        row[7],
        json_value(row[8]),
        json_value(row[9]),
    )


SUMMARY_COLUMNS = (
    "unit_kind",
    "unit_index",
    "n_active",
    "frequency",
    "mean_value",
    "max_value",
    "both_parents_active",
    "kept_count",
    "neighbours",
)
_SUMMARIES = RawQuery(
    f"SELECT {', '.join(SUMMARY_COLUMNS[:-1])}, CAST(neighbours AS TEXT) "
    "FROM unit_stats WHERE harvest_id = :harvest"
)


def unit_summaries(reader: RawReader, harvest_id: int) -> list[tuple[Any, ...]]:
    """Every unit's scalar statistics and neighbour list (``SUMMARY_COLUMNS``; the JSON as
    text, for ``json_value``: the driver's own decoder took most of the time), in no
    particular order."""
    return reader.all(_SUMMARIES, harvest=harvest_id)


@dataclass(frozen=True)
class ExplanationRow:
    unit_kind: int
    unit_index: int
    id: int
    text: str
    source: str
    author: str | None
    score: float | None
    created_at: datetime
    updated_at: datetime


_EXPLANATIONS = RawQuery("""
SELECT unit_kind, unit_index, id, text, source, author, score, created_at, updated_at
FROM explanation
WHERE sae_id = :sae AND deleted_at IS NULL
  AND ((unit_kind = 0 AND unit_index IN :latents)
       OR (unit_kind = 1 AND unit_index IN :bases)
       OR (unit_kind = 2 AND unit_index IN :extensions))
ORDER BY unit_kind, unit_index, score DESC NULLS LAST, updated_at DESC, id DESC
""")
_KIND_PARAM = {UnitKind.LATENT: "latents", UnitKind.BASE: "bases", UnitKind.EXTENSION: "extensions"}


def explanations_statement(sae_id: int, units: Iterable[tuple[int, int]]) -> Statement:
    """Live explanations of ``(unit_kind, unit_index)`` units (read with
    ``explanations_from_rows``)."""
    lists: dict[str, set[int]] = {name: set() for name in _KIND_PARAM.values()}
    for kind, index in units:
        lists[_KIND_PARAM[UnitKind(kind)]].add(int(index))
    return _EXPLANATIONS, {"sae": sae_id, **{k: sorted(v) for k, v in lists.items()}}


def explanations_from_rows(
    rows: list[tuple[Any, ...]],
) -> dict[tuple[int, int], list[ExplanationRow]]:
    """By unit: best score first, then newest (the order ``repositories.explanations``
    lists them in)."""
    out: dict[tuple[int, int], list[ExplanationRow]] = {}
    for r in rows:
        expl = ExplanationRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], utc(r[7]), utc(r[8]))  # type: ignore[arg-type]
        out.setdefault((r[0], r[1]), []).append(expl)
    return out


def explanations(
    reader: RawReader, sae_id: int, units: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], list[ExplanationRow]]:
    return explanations_from_rows(reader.batch([explanations_statement(sae_id, units)])[0])


@dataclass(frozen=True)
class ExplanationChange:
    """An explanation row as it is now, for caches that follow ``seq`` (deleted ones too)."""

    row: ExplanationRow
    seq: int
    deleted: bool


_CHANGES = RawQuery("""
SELECT unit_kind, unit_index, id, text, source, author, score, created_at, updated_at,
       seq, deleted_at IS NOT NULL
FROM explanation
WHERE sae_id = :sae AND seq > :after
ORDER BY seq
LIMIT :limit
""")


def explanation_changes(
    reader: RawReader, sae_id: int, after: int, limit: int
) -> list[ExplanationChange]:
    """The SAE's explanations whose ``seq`` is above ``after``, in ``seq`` order, at most
    ``limit`` of them (``after=0``: all of them, deleted ones included)."""
    out = []
    for r in reader.all(_CHANGES, sae=sae_id, after=int(after), limit=int(limit)):
        row = ExplanationRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], utc(r[7]), utc(r[8]))  # type: ignore[arg-type]
        out.append(ExplanationChange(row, int(r[9]), bool(r[10])))
    return out


EXAMPLE_COLUMNS = (
    "kind",
    "rank",
    "max_value",
    "max_pos",
    "sample_pos",
    "sample_value",
    "values",
    "context_id",
    "position",
    "token_ids",
)
"""The example columns of ``unit_page_from_rows``'s rows."""
_SAE_COLUMNS = 16
_UNIT_COLUMNS = 10
_UNIT_PAGE = RawQuery(
    "SELECT 0 AS part, "
    + _SAE.strip().removeprefix("SELECT").split("FROM sae s")[0].strip()
    + ", u.n_active, u.frequency, u.mean_value, u.max_value, u.histogram, u.histogram_edges,"
    " u.both_parents_active, u.kept_count, u.logit_effects, u.neighbours,"
    " NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
    " FROM sae s LEFT JOIN harvest h ON h.id = s.active_harvest_id"
    " LEFT JOIN unit_stats u ON u.harvest_id = :harvest AND u.unit_kind = :kind"
    " AND u.unit_index = :index"
    " WHERE s.slug = :slug"
    " UNION ALL"
    " SELECT 1, "
    + ", ".join(["NULL"] * (_SAE_COLUMNS + _UNIT_COLUMNS))
    + ', e.kind, e.rank, e.max_value, e.max_pos, e.sample_pos, e.sample_value, e."values",'
    " c.id, c.position, c.token_ids"
    " FROM example e JOIN context c ON c.id = e.context_id"
    " WHERE e.harvest_id = :harvest AND e.unit_kind = :kind AND e.unit_index = :index"
    " AND e.kind IN :kinds"
    " ORDER BY 1, 28, 29"
)


def unit_page_statement(
    slug: str, harvest_id: int | None, unit_kind: int, unit_index: int, kinds: Iterable[int]
) -> Statement:
    """A unit's whole page in one statement (one round trip, one result to read): the SAE's
    row as ``sae_by_slug_statement`` reads it, the unit's statistics (of harvest
    ``harvest_id``, as planned from a remembered row: the caller checks the SAE's row) and
    its examples of ``kinds`` with their contexts. Read with ``unit_page_from_rows``."""
    return _UNIT_PAGE, {
        "slug": slug,
        "harvest": harvest_id,
        "kind": int(unit_kind),
        "index": int(unit_index),
        "kinds": sorted({int(k) for k in kinds}),
    }


def unit_page_from_rows(
    rows: list[tuple[Any, ...]],
) -> tuple[list[tuple[Any, ...]], UnitRow | None, list[tuple[Any, ...]]]:
    """(the SAE statement's rows, the unit's statistics or None, its example rows in
    ``EXAMPLE_COLUMNS`` order)."""
    if not rows or rows[0][0] != 0:
        return [], None, []
    head = rows[0]
    sae = [head[1 : 1 + _SAE_COLUMNS]]
    unit_cols = head[1 + _SAE_COLUMNS : 1 + _SAE_COLUMNS + _UNIT_COLUMNS]
    unit = unit_from_rows([unit_cols]) if unit_cols[0] is not None else None
    first = 1 + _SAE_COLUMNS + _UNIT_COLUMNS
    return sae, unit, [r[first:] for r in rows[1:]]


_TOKENS = RawQuery("SELECT token_id, text FROM token WHERE harvest_id = :harvest")


def token_strings(reader: RawReader, harvest_id: int) -> dict[int, str]:
    """Every token string a harvest stored, by id."""
    return {int(tid): text for tid, text in reader.all(_TOKENS, harvest=harvest_id)}
