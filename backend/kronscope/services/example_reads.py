"""Example reads for feature pages, with each harvest's token strings cached in-process.

``db.repositories.examples.top_examples`` / ``sampled_examples`` look the display string of
every token up on every call: an ``IN`` list of up to a few thousand ids per page, which
costs more CPU (compiling and binding the statement) than everything else on a latent
page together. A complete harvest's token table never changes, so pages read it once per
process into an LRU of vocabularies and reuse it. The cache key includes the harvest's
``finished_at``, so an id reused after a delete (SQLite rowids) is never served stale.

The two queries here mirror the repository's ``_load`` without its token lookup; they
belong in ``db.repositories.examples`` (as a ``vocab=`` option) and should move there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..db.codec import unpack_f16, unpack_i32
from ..db.models import Context, Example, ExampleKind, Harvest, Sae, Token, UnitKind
from ..db.repositories.examples import ExampleView

VOCAB_CACHE_SIZE = 8
"""Harvests whose vocabularies are kept (each is the distinct tokens of one corpus)."""

_lock = threading.Lock()
_vocabs: OrderedDict[tuple[str, int, datetime | None], dict[int, str]] = OrderedDict()


def clear_cache() -> None:
    with _lock:
        _vocabs.clear()


def vocabulary(session: Session, harvest_id: int) -> dict[int, str]:
    """Every token string the harvest stored, by id (cached for complete harvests)."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, sa.Engine) else bind.engine
    finished = session.scalar(sa.select(Harvest.finished_at).where(Harvest.id == harvest_id))
    key = (engine.url.render_as_string(hide_password=True), harvest_id, finished)
    with _lock:
        found = _vocabs.get(key)
        if found is not None:
            _vocabs.move_to_end(key)
            return found
    rows = session.execute(
        sa.select(Token.token_id, Token.text).where(Token.harvest_id == harvest_id)
    )
    vocab = {int(row[0]): row[1] for row in rows}
    if finished is not None:  # only a finished harvest's tokens are final
        with _lock:
            _vocabs[key] = vocab
            while len(_vocabs) > VOCAB_CACHE_SIZE:
                _vocabs.popitem(last=False)
    return vocab


def _load(
    session: Session, harvest_id: int, where: Sequence[Any], limit: int | None
) -> list[ExampleView]:
    stmt = (
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
        .limit(limit)
    )
    rows = session.execute(stmt).all()
    if not rows:
        return []
    vocab = vocabulary(session, harvest_id)
    out = []
    for r in rows:
        ids = unpack_i32(r.token_ids)
        out.append(
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
        )
    return out


def top_examples(
    session: Session, sae: Sae, unit_kind: int, unit_index: int, *, limit: int | None = None
) -> list[ExampleView]:
    """Top-activating examples of a unit of the active harvest, best first."""
    if sae.active_harvest_id is None:
        return []
    where = [
        Example.unit_kind == int(UnitKind(unit_kind)),
        Example.unit_index == unit_index,
        Example.kind == int(ExampleKind.TOP),
    ]
    return _load(session, sae.active_harvest_id, where, limit)


def sampled_examples(
    session: Session, sae: Sae, unit_kind: int, unit_index: int
) -> list[ExampleView]:
    """Every reservoir sample of a unit of the active harvest."""
    if sae.active_harvest_id is None:
        return []
    where = [
        Example.unit_kind == int(UnitKind(unit_kind)),
        Example.unit_index == unit_index,
        Example.kind == int(ExampleKind.SAMPLE),
    ]
    return _load(session, sae.active_harvest_id, where, None)
