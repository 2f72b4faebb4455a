"""Tokens, contexts and examples: the harvest's bulk writes and the pages' example reads.

Writes are idempotent where a resumed harvest may repeat them (tokens, contexts); examples
are written once per unit, when the harvest's top-k and reservoirs are final.
Reads go through the SAE's active harvest unless a harvest id is given explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..codec import pack_f16, pack_i32, to_float32, unpack_f16, unpack_i32
from ..models import Context, Example, ExampleKind, Sae, Token, UnitKind
from ._bulk import bulk_insert
from ._common import chunked

# -- writes -------------------------------------------------------------------------------


def add_tokens(session: Session, harvest_id: int, tokens: Mapping[int, str]) -> int:
    """Store the display string of each token id once per harvest; ids already stored are
    skipped. Returns how many were added."""
    if not tokens:
        return 0
    existing: set[int] = set()
    for chunk in chunked(sorted(tokens)):
        existing.update(
            session.scalars(
                sa.select(Token.token_id).where(
                    Token.harvest_id == harvest_id, Token.token_id.in_(chunk)
                )
            )
        )
    rows = [
        {"harvest_id": harvest_id, "token_id": int(tid), "text": str(text)}
        for tid, text in tokens.items()
        if int(tid) not in existing
    ]
    return bulk_insert(session, Token, rows)


def _context_ids(session: Session, harvest_id: int, positions: Iterable[int]) -> dict[int, int]:
    found: dict[int, int] = {}
    for chunk in chunked(sorted({int(p) for p in positions})):
        rows = session.execute(
            sa.select(Context.position, Context.id).where(
                Context.harvest_id == harvest_id, Context.position.in_(chunk)
            )
        )
        found.update((int(pos), int(cid)) for pos, cid in rows)
    return found


def add_contexts(
    session: Session, harvest_id: int, contexts: Iterable[tuple[int, Any]]
) -> dict[int, int]:
    """Store ``(position, token_ids)`` windows; positions already stored are kept as they
    are. Returns ``{position: context id}`` for every position given."""
    by_position = {int(pos): ids for pos, ids in contexts}
    if not by_position:
        return {}
    found = _context_ids(session, harvest_id, by_position)
    new = [pos for pos in by_position if pos not in found]
    if new:
        rows = [
            {
                "harvest_id": harvest_id,
                "position": pos,
                "token_ids": ids if isinstance(ids := by_position[pos], bytes) else pack_i32(ids),
            }
            for pos in new
        ]
        bulk_insert(session, Context, rows)
        found.update(_context_ids(session, harvest_id, new))
    return found


@dataclass(frozen=True)
class ExampleRow:
    """One example to write. ``values``: bytes from ``pack_f16`` or an array (packed here).
    ``max_value``/``max_pos`` are computed from the values when left out."""

    unit_kind: int
    unit_index: int
    kind: int
    rank: int
    context_id: int
    values: Any
    max_value: float | None = None
    max_pos: int | None = None
    sample_pos: int | None = None
    sample_value: float | None = None


def _example_dict(harvest_id: int, row: ExampleRow) -> dict[str, Any]:
    max_value, max_pos = row.max_value, row.max_pos
    if isinstance(row.values, bytes):
        packed = row.values
        arr = unpack_f16(packed) if max_value is None or max_pos is None else None
    else:
        arr = to_float32(row.values)
        packed = pack_f16(arr)
    if arr is not None:
        if max_pos is None:
            max_pos = int(np.argmax(arr)) if arr.size else 0
        if max_value is None:
            max_value = float(arr[max_pos]) if arr.size else 0.0
    assert max_value is not None and max_pos is not None
    return {
        "harvest_id": harvest_id,
        "unit_kind": int(row.unit_kind),
        "unit_index": int(row.unit_index),
        "kind": int(row.kind),
        "rank": int(row.rank),
        "context_id": int(row.context_id),
        "max_value": float(max_value),
        "max_pos": int(max_pos),
        "values": packed,
        "sample_pos": row.sample_pos,
        "sample_value": row.sample_value,
    }


def add_examples(session: Session, harvest_id: int, rows: Iterable[ExampleRow]) -> int:
    """Bulk-write examples (COPY on PostgreSQL). Returns the number written."""
    return bulk_insert(session, Example, (_example_dict(harvest_id, r) for r in rows))


# -- reads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleView:
    """An example with its context, ready to render."""

    id: int
    unit_kind: int
    unit_index: int
    kind: int
    rank: int
    max_value: float
    max_pos: int
    sample_pos: int | None
    sample_value: float | None
    context_id: int
    position: int
    token_ids: np.ndarray
    tokens: list[str]
    values: np.ndarray


def token_strings(session: Session, harvest_id: int, token_ids: Iterable[int]) -> dict[int, str]:
    """Display strings of the given ids (ids the harvest did not store are absent)."""
    out: dict[int, str] = {}
    for chunk in chunked(sorted({int(t) for t in token_ids})):
        rows = session.execute(
            sa.select(Token.token_id, Token.text).where(
                Token.harvest_id == harvest_id, Token.token_id.in_(chunk)
            )
        )
        out.update((int(tid), str(text)) for tid, text in rows)
    return out


def _harvest_of(sae: Sae, harvest_id: int | None) -> int | None:
    return sae.active_harvest_id if harvest_id is None else harvest_id


def _select(harvest_id: Any, where: Sequence[Any]) -> sa.Select[*tuple[Any, ...]]:
    return (
        sa.select(
            Example.id,
            Example.unit_kind,
            Example.unit_index,
            Example.kind,
            Example.rank,
            Example.max_value,
            Example.max_pos,
            Example.sample_pos,
            Example.sample_value,
            Example.values,
            Context.id.label("context_id"),
            Context.position,
            Context.token_ids,
        )
        .join(Context, Context.id == Example.context_id)
        .where(Example.harvest_id == harvest_id, *where)
        .order_by(Example.kind, Example.rank)
    )


def _views(
    session: Session,
    harvest_id: int,
    rows: Sequence[Any],
    vocab: Mapping[int, str] | None = None,
) -> list[ExampleView]:
    """Decode rows of ``_select``; token strings from ``vocab`` (the harvest's whole token
    table, e.g. cached by the caller) or else looked up for these contexts' ids."""
    if not rows:
        return []
    decoded = [unpack_i32(r.token_ids) for r in rows]
    if vocab is None:
        vocab = token_strings(session, harvest_id, (int(t) for ids in decoded for t in ids))
    return [
        ExampleView(
            id=r.id,
            unit_kind=r.unit_kind,
            unit_index=r.unit_index,
            kind=r.kind,
            rank=r.rank,
            max_value=float(r.max_value),
            max_pos=r.max_pos,
            sample_pos=r.sample_pos,
            sample_value=None if r.sample_value is None else float(r.sample_value),
            context_id=r.context_id,
            position=r.position,
            token_ids=ids,
            tokens=[vocab.get(t, f"<{t}>") for t in ids.tolist()],
            values=unpack_f16(r.values),
        )
        for r, ids in zip(rows, decoded, strict=True)
    ]


def _load(
    session: Session,
    harvest_id: int,
    where: Sequence[Any],
    limit: int | None,
    vocab: Mapping[int, str] | None = None,
) -> list[ExampleView]:
    """The examples matching ``where``, in kind then rank order."""
    rows = session.execute(_select(harvest_id, where).limit(limit)).all()
    return _views(session, harvest_id, rows, vocab)


# A page's query, built once: the unit and the example kinds are bound when it runs.
_UNIT_EXAMPLES = _select(
    sa.bindparam("harvest_id"),
    [
        Example.unit_kind == sa.bindparam("unit_kind"),
        Example.unit_index == sa.bindparam("unit_index"),
        Example.kind.in_(sa.bindparam("kinds", expanding=True)),
    ],
)


def _unit_where(unit_kind: int, unit_index: int) -> list[Any]:
    return [Example.unit_kind == int(UnitKind(unit_kind)), Example.unit_index == unit_index]


def unit_examples(
    session: Session,
    sae: Sae,
    unit_kind: int,
    unit_index: int,
    *,
    top_limit: int | None = None,
    samples: bool = True,
    harvest_id: int | None = None,
    vocab: Mapping[int, str] | None = None,
) -> tuple[list[ExampleView], list[ExampleView]]:
    """A unit's top examples (best first, at most ``top_limit``) and, with ``samples``,
    every reservoir sample, in one query: what a feature page shows."""
    hid = _harvest_of(sae, harvest_id)
    kinds = ([int(ExampleKind.TOP)] if top_limit != 0 else []) + (
        [int(ExampleKind.SAMPLE)] if samples else []
    )
    if hid is None or not kinds:
        return [], []
    params = {
        "harvest_id": hid,
        "unit_kind": int(UnitKind(unit_kind)),
        "unit_index": int(unit_index),
        "kinds": kinds,
    }
    rows = session.execute(_UNIT_EXAMPLES, params).all()
    top = [r for r in rows if r.kind == ExampleKind.TOP][:top_limit]
    sampled = [r for r in rows if r.kind == ExampleKind.SAMPLE]
    views = _views(session, hid, top + sampled, vocab)
    return views[: len(top)], views[len(top) :]


def top_examples(
    session: Session,
    sae: Sae,
    unit_kind: int,
    unit_index: int,
    *,
    limit: int | None = None,
    harvest_id: int | None = None,
    vocab: Mapping[int, str] | None = None,
) -> list[ExampleView]:
    """Top-activating examples of a unit, best first, with their contexts and tokens."""
    hid = _harvest_of(sae, harvest_id)
    if hid is None:
        return []
    where = [*_unit_where(unit_kind, unit_index), Example.kind == int(ExampleKind.TOP)]
    return _load(session, hid, where, limit, vocab)


def sampled_examples(
    session: Session,
    sae: Sae,
    unit_kind: int,
    unit_index: int,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    limit: int | None = None,
    harvest_id: int | None = None,
    vocab: Mapping[int, str] | None = None,
) -> list[ExampleView]:
    """Reservoir samples of a unit whose sampled value lies in ``[min_value, max_value)``."""
    hid = _harvest_of(sae, harvest_id)
    if hid is None:
        return []
    where: list[Any] = [
        *_unit_where(unit_kind, unit_index),
        Example.kind == int(ExampleKind.SAMPLE),
    ]
    if min_value is not None:
        where.append(Example.sample_value >= min_value)
    if max_value is not None:
        where.append(Example.sample_value < max_value)
    return _load(session, hid, where, limit, vocab)
