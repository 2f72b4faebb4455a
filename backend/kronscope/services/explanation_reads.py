"""The explanations feature pages show, cached in-process and kept exact.

A latent page shows the explanations of up to fifty units (the latent, its two parents,
its row and column siblings, its decoder neighbours), a latent list those of fifty
latents. Read per page, that statement was most of the database's share of a page, and
turning its rows into records a good part of the server's. Explanations change (edits,
soft deletes, explain jobs, imports), so the cache follows the database's change numbers
(``explanation.seq``, alembic 0003: every insert and update gives its row a number above
every earlier one of its SAE, and the writers of one SAE commit in that order):

- the first page of an SAE in a process reads all its explanations (one query) and keeps
  the largest ``seq`` it saw;
- every page's SAE statement also reads the SAE's largest ``seq`` (an index lookup, in
  the same round trip as the page's other reads). When it is above what the cache has,
  the rows changed since are read (``seq >`` what the cache has: one indexed query) and
  applied before the page is built. So a page shows at least what was committed when its
  own statement ran: an edit shows on the next page, in every process.

Bounded: SAEs are kept whole in an LRU of ``CACHE_ROWS`` explanation rows, all SAEs
together. An SAE with more than ``SAE_MAX_ROWS`` explanations is not kept, and its pages
read their units' explanations with their other statements, as before
(``pages.explanations_statement``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import datetime

from ..db.raw import RawReader
from ..db.repositories import pages as pages_repo
from ..db.repositories.pages import ExplanationChange, ExplanationRow, SaeRef
from .harvest_reads import _LRU

CACHE_ROWS = 2_000_000
"""Explanation rows kept, all SAEs together (a few hundred bytes each)."""
SAE_MAX_ROWS = 400_000
"""An SAE with more explanations than this is not cached."""
CHANGE_BATCH = 20_000
"""Changed rows read per query while catching up."""

SaeKey = tuple[str, int, datetime | None]
"""(database, SAE id, the SAE's created_at)."""
Units = dict[tuple[int, int], list[ExplanationRow]]


def _order(e: ExplanationRow) -> tuple[bool, float, float, int]:
    """Best first: score descending (none last), then the newest, then the highest id (the
    order of ``pages.explanations_statement``)."""
    score = e.score
    return (score is None, -(score or 0.0), -e.updated_at.timestamp(), -e.id)


class SaeExplanations:
    """One SAE's live explanations by unit (best first), complete up to ``seq``."""

    def __init__(self, changes: Sequence[ExplanationChange]) -> None:
        self.seq = 0
        self.lock = threading.Lock()
        self.units: Units = {}
        self._unit_of: dict[int, tuple[int, int]] = {}
        self.apply(changes, 0)

    @property
    def rows(self) -> int:
        return len(self._unit_of)

    def apply(self, changes: Sequence[ExplanationChange], seen: int) -> None:
        """Take ``changes`` (rows as they are now, in ``seq`` order) and note that every
        change up to ``seen`` (or up to the last of them) is in. Lists are replaced, never
        changed in place, so a page holding one keeps a consistent list."""
        touched: dict[tuple[int, int], list[ExplanationRow]] = {}
        for change in changes:
            row = change.row
            old = self._unit_of.pop(row.id, None)
            if old is not None:
                items = touched.get(old, self.units.get(old, []))
                touched[old] = [e for e in items if e.id != row.id]
            if not change.deleted:
                key = (row.unit_kind, row.unit_index)
                touched[key] = [*touched.get(key, self.units.get(key, [])), row]
                self._unit_of[row.id] = key
        for key, items in touched.items():
            if items:
                self.units[key] = sorted(items, key=_order)
            else:
                self.units.pop(key, None)
        last = changes[-1].seq if changes else 0
        self.seq = max(self.seq, seen, last)

    def catch_up(self, reader: RawReader, sae_id: int, seq: int) -> None:
        """Read and apply every change up to ``seq`` (the SAE's largest, as a statement
        that ran on ``reader``'s database saw it)."""
        with self.lock:
            while self.seq < seq:
                changes = pages_repo.explanation_changes(reader, sae_id, self.seq, CHANGE_BATCH)
                complete = len(changes) < CHANGE_BATCH
                self.apply(changes, seq if complete else 0)
                if complete:
                    break

    def lookup(self, units: Iterable[tuple[int, int]]) -> Units:
        found = self.units
        return {u: found[u] for u in units if u in found}


class _TooMany:
    """Marks an SAE with more explanations than ``SAE_MAX_ROWS``."""

    rows = 1


_TOO_MANY = _TooMany()
_cache = _LRU(CACHE_ROWS, weigh=lambda e: max(1, e.rows))


def clear_cache() -> None:
    _cache.clear()


def _load(reader: RawReader, sae_id: int) -> SaeExplanations | _TooMany:
    changes = pages_repo.explanation_changes(reader, sae_id, 0, SAE_MAX_ROWS + 1)
    if len(changes) > SAE_MAX_ROWS:
        return _TOO_MANY
    return SaeExplanations(changes)


def cached(reader: RawReader, sae: SaeRef) -> SaeExplanations | None:
    """The SAE's cached explanations (read whole the first time), or None when it has
    too many to keep: then its pages read their own."""
    key: SaeKey = (reader.database, sae.id, sae.created_at)
    entry = _cache.get_or_make(key, lambda: _load(reader, sae.id))
    if isinstance(entry, SaeExplanations) and entry.rows > SAE_MAX_ROWS:
        _cache.put(key, _TOO_MANY)  # grew past the bound since it was read
        return None
    return entry if isinstance(entry, SaeExplanations) else None


def explanations(
    reader: RawReader,
    entry: SaeExplanations,
    sae: SaeRef,
    seq: int,
    units: Iterable[tuple[int, int]],
) -> Units:
    """The live explanations of ``units`` (those that have any), best first, at least as
    new as ``seq`` (the SAE's largest change number, read by the page's statement)."""
    if seq > entry.seq:
        entry.catch_up(reader, sae.id, seq)
    return entry.lookup(units)
