"""Reads of a harvest for feature pages, with what never changes cached in-process.

A complete harvest's token table and unit statistics never change, so:

- ``vocabulary``: every token string of a harvest, read once per process into an LRU.
  ``db.repositories.examples`` otherwise looks the display string of every token up on
  every call: an ``IN`` list of up to a few thousand ids per page, which cost more CPU
  (compiling and binding the statement) than everything else on a latent page together.
- ``list_total``: how many units a latent-list filter matches (density range, head), so a
  page of the list is not also a count over every unit. Filters on explanations (which do
  change) are never cached.

Every key includes the harvest's ``finished_at``, so an id reused after a delete (SQLite
rowids) is never served stale, and nothing of an unfinished harvest is cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import datetime
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..db.models import Harvest, Sae, Token
from ..db.repositories import examples as examples_repo
from ..db.repositories.examples import ExampleView

T = TypeVar("T")


class _LRU:
    """A small thread-safe LRU of finished harvests' data."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def get_or_make(self, key: Hashable | None, make: Callable[[], T]) -> T:
        """The cached value of ``key``, or ``make()`` (stored only when ``key`` is given)."""
        if key is not None:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]  # type: ignore[return-value]
        value = make()
        if key is not None:
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


VOCAB_CACHE_SIZE = 8
"""Harvests whose vocabularies are kept (each is the distinct tokens of one corpus)."""
TOTAL_CACHE_SIZE = 4096
"""Latent-list totals kept (one small int per harvest and filter)."""

_vocabs = _LRU(VOCAB_CACHE_SIZE)
_totals = _LRU(TOTAL_CACHE_SIZE)


def clear_cache() -> None:
    _vocabs.clear()
    _totals.clear()


_FINISHED_AT = sa.select(Harvest.finished_at).where(Harvest.id == sa.bindparam("harvest_id"))


def _finished_key(session: Session, harvest_id: int) -> tuple[str, int, datetime] | None:
    """What identifies a finished harvest across databases; None while it is unfinished."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, sa.Engine) else bind.engine
    finished = session.scalar(_FINISHED_AT, {"harvest_id": harvest_id})
    if finished is None:
        return None
    return engine.url.render_as_string(hide_password=True), harvest_id, finished


def vocabulary(session: Session, harvest_id: int) -> dict[int, str]:
    """Every token string the harvest stored, by id (cached for finished harvests)."""

    def read() -> dict[int, str]:
        rows = session.execute(
            sa.select(Token.token_id, Token.text).where(Token.harvest_id == harvest_id)
        )
        return {int(row[0]): row[1] for row in rows}

    return _vocabs.get_or_make(_finished_key(session, harvest_id), read)


def list_total(
    session: Session, harvest_id: int, filters: Hashable, count: Callable[[], int]
) -> int:
    """``count()``, cached per finished harvest and ``filters`` (which must not involve
    explanations: they change after the harvest)."""
    key = _finished_key(session, harvest_id)
    return _totals.get_or_make(None if key is None else (*key, filters), count)


def unit_examples(
    session: Session,
    sae: Sae,
    unit_kind: int,
    unit_index: int,
    *,
    top_limit: int | None = None,
    samples: bool = True,
) -> tuple[list[ExampleView], list[ExampleView]]:
    """A unit's top examples (best first, at most ``top_limit``) and every reservoir sample
    of the active harvest, in one query (token strings from the cached vocabulary)."""
    if sae.active_harvest_id is None or (top_limit == 0 and not samples):
        return [], []
    vocab = vocabulary(session, sae.active_harvest_id)
    return examples_repo.unit_examples(
        session, sae, unit_kind, unit_index, top_limit=top_limit, samples=samples, vocab=vocab
    )
