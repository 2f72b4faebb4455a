"""Explanations of latents and parents: write with history, soft delete, full-text search.

Explanations belong to the SAE (not a harvest) and so survive re-harvests. Every version
of the text, the first included, is an ``explanation_revision`` row. Search uses each
database's own index: FTS5 (bm25, ``snippet``) on SQLite, ``tsvector``/GIN
(``websearch_to_tsquery``, ``ts_rank_cd``, ``ts_headline``) on PostgreSQL. User text is
sanitised by ``search_syntax`` first, so no query is ever a syntax error.
"""

from __future__ import annotations

import functools
import html
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..base import utcnow
from ..errors import NotFound
from ..models import Explanation, ExplanationRevision, Sae, UnitKind
from ._common import Page, chunked, units_clause, units_params
from .search_syntax import SearchQuery, parse_search_query

# Highlight markers: private-use characters, never in real text; turned into segments.
MARK_START, MARK_END = "\ue000", "\ue001"
_HIDDEN_ANGLES = "\ue002\ue003"
_RESTORE_ANGLES = str.maketrans(_HIDDEN_ANGLES, "<>")
_UNSET: Any = object()


def validate_source(source: str) -> str:
    source = source.strip()
    if source in ("human", "heuristic") or (source.startswith("llm:") and len(source) > 4):
        return source
    raise ValueError(f"source must be 'human', 'heuristic' or 'llm:<model>', not {source!r}")


def create_explanation(
    session: Session,
    sae_id: int,
    unit_kind: int,
    unit_index: int,
    text: str,
    *,
    source: str = "human",
    author: str | None = None,
    score: float | None = None,
) -> Explanation:
    text = text.strip()
    if not text:
        raise ValueError("an explanation needs some text")
    source = validate_source(source)
    expl = Explanation(
        sae_id=sae_id,
        unit_kind=int(UnitKind(unit_kind)),
        unit_index=unit_index,
        text=text,
        source=source,
        author=author,
        score=score,
    )
    session.add(expl)
    session.flush()
    session.add(
        ExplanationRevision(explanation_id=expl.id, text=text, author=author, source=source)
    )
    session.flush()
    return expl


def get_explanation(
    session: Session, explanation_id: int, *, include_deleted: bool = False
) -> Explanation | None:
    expl = session.get(Explanation, explanation_id)
    if expl is None or (expl.deleted_at is not None and not include_deleted):
        return None
    return expl


def _require(session: Session, explanation_id: int) -> Explanation:
    expl = get_explanation(session, explanation_id)
    if expl is None:
        raise NotFound(f"no explanation {explanation_id}")
    return expl


def update_explanation(
    session: Session,
    explanation_id: int,
    text: str,
    *,
    author: str | None = None,
    source: str | None = None,
    score: float | None = _UNSET,
) -> Explanation:
    """Replace the text; the new version is added to the history (old ones are kept)."""
    expl = _require(session, explanation_id)
    text = text.strip()
    if not text:
        raise ValueError("an explanation needs some text")
    source = validate_source(source) if source is not None else expl.source
    expl.text = text
    expl.source = source
    if author is not None:
        expl.author = author
    if score is not _UNSET:
        expl.score = score
    session.add(
        ExplanationRevision(explanation_id=expl.id, text=text, author=author, source=source)
    )
    session.flush()
    return expl


def delete_explanation(session: Session, explanation_id: int) -> None:
    """Soft delete: hidden from pages and search, kept with its history."""
    expl = _require(session, explanation_id)
    expl.deleted_at = utcnow()
    session.flush()


def explanation_history(session: Session, explanation_id: int) -> list[ExplanationRevision]:
    """Every version, oldest first (deleted explanations included)."""
    return list(
        session.scalars(
            sa.select(ExplanationRevision)
            .where(ExplanationRevision.explanation_id == explanation_id)
            .order_by(ExplanationRevision.id)
        )
    )


def explanations_for_units(
    session: Session, sae_id: int, unit_kind: int, unit_indices: Iterable[int]
) -> dict[int, list[Explanation]]:
    """Live explanations of the given units, best score first, then newest."""
    kind = int(unit_kind)
    found = explanations_for_keys(session, sae_id, ((kind, int(i)) for i in unit_indices))
    return {index: items for (_, index), items in found.items()}


@functools.cache
def _explanations_select(kinds: tuple[int, ...]) -> sa.Select[Explanation]:
    return (
        sa.select(Explanation)
        .where(
            Explanation.sae_id == sa.bindparam("sae_id"),
            units_clause(Explanation.unit_kind, Explanation.unit_index, kinds),
            Explanation.deleted_at.is_(None),
        )
        .order_by(
            Explanation.unit_kind,
            Explanation.unit_index,
            Explanation.score.desc().nulls_last(),
            Explanation.updated_at.desc(),
            Explanation.id.desc(),
        )
    )


def explanations_for_keys(
    session: Session, sae_id: int, units: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], list[Explanation]]:
    """Live explanations of units of any kinds, ``(unit_kind, unit_index)``, in one query
    per thousand units: by unit, best score first, then newest."""
    out: dict[tuple[int, int], list[Explanation]] = defaultdict(list)
    keys = sorted({(int(k), int(i)) for k, i in units})
    for chunk in chunked(keys):
        kinds, params = units_params(chunk)
        for expl in session.scalars(_explanations_select(kinds), {"sae_id": sae_id, **params}):
            out[(expl.unit_kind, expl.unit_index)].append(expl)
    return dict(out)


# -- full-text search ---------------------------------------------------------------------

_fts = sa.table("explanation_fts", sa.column("rowid", sa.Integer), sa.column("explanation_fts"))
_ENGLISH: sa.ColumnClause[Any] = sa.literal_column("'english'::regconfig")
_SEARCH_VECTOR: sa.ColumnClause[Any] = sa.literal_column("explanation.search_vector")
_HEADLINE_OPTIONS = f"StartSel={MARK_START}, StopSel={MARK_END}, MaxWords=40, MinWords=20"


@dataclass(frozen=True)
class SearchHit:
    explanation: Explanation
    sae_slug: str
    rank: float
    """Higher is more relevant (bm25 is negated on SQLite)."""
    snippet: list[tuple[str, bool]]
    """The text around the matches as ``(text, is_match)`` segments."""

    @property
    def snippet_html(self) -> str:
        """The snippet escaped, with matches in ``<mark>``."""
        return "".join(
            f"<mark>{html.escape(t)}</mark>" if hit else html.escape(t) for t, hit in self.snippet
        )


def split_highlights(text: str) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for i, part in enumerate(text.split(MARK_START)):
        if i == 0:
            if part:
                segments.append((part.replace(MARK_END, ""), False))
            continue
        marked, _, rest = part.partition(MARK_END)
        if marked:
            segments.append((marked, True))
        if rest:
            segments.append((rest, False))
    return segments


def _fts_match(query: SearchQuery) -> Any:
    return _fts.c.explanation_fts.op("MATCH")(query.to_fts5())


def match_clause(session: Session, query: SearchQuery) -> Any:
    """A WHERE clause on ``explanation`` selecting the rows that match ``query``.

    SQLite: ``explanation.id IN (SELECT rowid FROM explanation_fts WHERE ... MATCH ...)``,
    evaluated once; a join would let the planner run one full-text query per row.
    """
    if session.get_bind().dialect.name == "postgresql":
        tsq = sa.func.websearch_to_tsquery(_ENGLISH, query.to_websearch())
        return _SEARCH_VECTOR.op("@@")(tsq)
    return Explanation.id.in_(sa.select(_fts.c.rowid).where(_fts_match(query)))


def matching_units(
    session: Session, sae_id: int, unit_kind: int, text: str
) -> sa.Select[Any] | None:
    """A subquery of unit indices whose live explanations match ``text`` (None: no terms)."""
    query = parse_search_query(text)
    if query is None:
        return None
    return sa.select(Explanation.unit_index).where(
        Explanation.sae_id == sae_id,
        Explanation.unit_kind == int(unit_kind),
        Explanation.deleted_at.is_(None),
        match_clause(session, query),
    )


def search_explanations(
    session: Session,
    text: str,
    *,
    sae_id: int | None = None,
    unit_kind: int | None = None,
    limit: int = 20,
    offset: int = 0,
) -> Page[SearchHit]:
    """Full-text search over live explanations (all SAEs unless ``sae_id``), best first."""
    query = parse_search_query(text)
    if query is None:
        return Page([], 0)
    filters: list[Any] = [Explanation.deleted_at.is_(None)]
    if sae_id is not None:
        filters.append(Explanation.sae_id == sae_id)
    if unit_kind is not None:
        filters.append(Explanation.unit_kind == int(unit_kind))
    if session.get_bind().dialect.name == "postgresql":
        rows, total = _search_postgres(session, query, filters, limit, offset)
    else:
        rows, total = _search_sqlite(session, query, filters, limit, offset)
    hits = [
        SearchHit(
            explanation=expl,
            sae_slug=slug,
            rank=float(rank),
            snippet=split_highlights((snippet or "").translate(_RESTORE_ANGLES)),
        )
        for expl, slug, rank, snippet in rows
    ]
    return Page(hits, total)


_SearchRows = list[tuple[Explanation, str, float, str | None]]


def _search_postgres(
    session: Session, query: SearchQuery, filters: list[Any], limit: int, offset: int
) -> tuple[_SearchRows, int]:
    tsq = sa.func.websearch_to_tsquery(_ENGLISH, query.to_websearch())
    where = [*filters, _SEARCH_VECTOR.op("@@")(tsq)]
    rank = sa.func.ts_rank_cd(_SEARCH_VECTOR, tsq).label("rank")
    # ts_headline drops what looks like an HTML tag: hide < and > from it, put back after.
    hidden = sa.func.translate(Explanation.text, "<>", _HIDDEN_ANGLES)
    snippet = sa.func.ts_headline(_ENGLISH, hidden, tsq, _HEADLINE_OPTIONS)
    rows = session.execute(
        sa.select(Explanation, Sae.slug, rank, snippet)
        .join(Sae, Sae.id == Explanation.sae_id)
        .where(*where)
        .order_by(rank.desc(), Explanation.id)
        .limit(limit)
        .offset(offset)
    ).all()
    total = session.scalar(sa.select(sa.func.count()).select_from(Explanation).where(*where)) or 0
    return [(r[0], r[1], r[2], r[3]) for r in rows], total


def _search_sqlite(
    session: Session, query: SearchQuery, filters: list[Any], limit: int, offset: int
) -> tuple[_SearchRows, int]:
    # Rank every match once (a materialised CTE driven by the FTS index), filter and page
    # through a join, then build snippets for the page's rows only.
    matches = (
        sa.select(
            _fts.c.rowid.label("id"),
            (-sa.func.bm25(sa.literal_column("explanation_fts"))).label("rank"),
        )
        .where(_fts_match(query))
        .cte("fts_matches")
        .prefix_with("MATERIALIZED")
    )
    joined = sa.join(matches, Explanation, Explanation.id == matches.c.id)
    rows = session.execute(
        sa.select(Explanation, Sae.slug, matches.c.rank)
        .select_from(joined)
        .join(Sae, Sae.id == Explanation.sae_id)
        .where(*filters)
        .order_by(matches.c.rank.desc(), Explanation.id)
        .limit(limit)
        .offset(offset)
    ).all()
    total = session.scalar(sa.select(sa.func.count()).select_from(joined).where(*filters)) or 0
    snippets: dict[int, str] = {}
    if rows:
        snippet = sa.func.snippet(
            sa.literal_column("explanation_fts"), 0, MARK_START, MARK_END, "…", 32
        )
        snippets = {
            int(rowid): str(text)
            for rowid, text in session.execute(
                sa.select(_fts.c.rowid, snippet).where(
                    _fts_match(query), _fts.c.rowid.in_([r[0].id for r in rows])
                )
            )
        }
    return [(r[0], r[1], r[2], snippets.get(r[0].id)) for r in rows], total
