"""What feature pages read of a finished harvest, cached in-process.

Everything a complete harvest stored is final: its token strings, its contexts and every
unit's statistics never change (explanations, which do, are not here). So each process
keeps, per finished harvest, in LRUs:

- ``summaries``: every unit's scalar statistics (active count, density, mean, maximum, the
  AND counts) as numpy columns, read with one query the first time a page needs them.
  Latent lists are then slices of a sort order computed once (the database walked its
  sort index to the offset on every page, and counted the matches), and a latent page's
  siblings, parents and neighbours are lookups.
- ``vocabulary``: every token string of the harvest (a page's examples hold a few thousand
  token ids), and ``context_tokens``: a context's token strings, decoded once.

The key of a harvest's entries is its database, id and ``finished_at``, so an id reused
after a delete (SQLite rowids) is never served stale, and nothing of an unfinished
harvest is cached. Concurrent requests that miss the same entry wait for one reader
instead of each running the same query.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

import numpy as np

from ..db.codec import unpack_i32
from ..db.models import UnitKind
from ..db.raw import RawReader, json_value
from ..db.repositories import pages as pages_repo
from ..db.repositories.pages import SaeRef

T = TypeVar("T")
HarvestKey = tuple[str, int, datetime | None]
"""(database, harvest id, finished_at); nothing is cached while finished_at is None."""
SortKey = Literal["index", "frequency", "max_value"]


class _LRU:
    """A thread-safe LRU bounded by the total weight of its values. A miss is computed by
    one thread; others asking for the same key meanwhile wait for its result."""

    def __init__(self, capacity: int, weigh: Callable[[Any], int] = lambda _: 1) -> None:
        self.capacity = capacity
        self._weigh = weigh
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._weight = 0
        self._making: dict[Hashable, threading.Lock] = {}

    def get_or_make(self, key: Hashable, make: Callable[[], T], *, cache: bool = True) -> T:
        if not cache:
            return make()
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key][0]  # type: ignore[return-value]
                gate = self._making.get(key)
                mine = gate is None
                if mine:
                    gate = self._making[key] = threading.Lock()
                    gate.acquire()
            if not mine:
                with gate:  # type: ignore[union-attr]  # wait for the maker, then look again
                    pass
                continue
            try:
                value = make()
                weight = self._weigh(value)
                with self._lock:
                    if weight <= self.capacity:
                        self._items[key] = (value, weight)
                        self._weight += weight
                        while self._weight > self.capacity:
                            _, (_, w) = self._items.popitem(last=False)
                            self._weight -= w
                return value
            finally:
                with self._lock:
                    del self._making[key]
                gate.release()  # type: ignore[union-attr]

    def peek(self, key: Hashable) -> Any:
        """The value of ``key`` or None (never computes)."""
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` (None removes the key)."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= old[1]
            if value is None:
                return
            weight = self._weigh(value)
            if weight > self.capacity:
                return
            self._items[key] = (value, weight)
            self._weight += weight
            while self._weight > self.capacity:
                _, (_, w) = self._items.popitem(last=False)
                self._weight -= w

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._weight = 0


class KindSummary:
    """The scalar statistics of one unit kind of a harvest, one row per unit, sorted by
    unit index. Missing values (a NULL mean, the AND counts of non-KronSAE units) are NaN."""

    COLUMNS = ("n_active", "frequency", "mean_value", "max_value", "both_parents_active",
               "kept_count")  # fmt: skip

    def __init__(self, index: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        order = np.argsort(index, kind="stable")
        self.index = index[order].astype(np.int64)
        self.n_active = columns["n_active"][order].astype(np.int64)
        self.frequency = columns["frequency"][order].astype(np.float64)
        self.mean_value = columns["mean_value"][order].astype(np.float64)
        self.max_value = columns["max_value"][order].astype(np.float64)
        self.both_parents_active = columns["both_parents_active"][order].astype(np.float64)
        self.kept_count = columns["kept_count"][order].astype(np.float64)
        self.table = np.column_stack(
            [self.n_active.astype(np.float64), self.frequency, self.mean_value, self.max_value,
             self.both_parents_active, self.kept_count]
        ).reshape(len(self.index), len(self.COLUMNS))  # fmt: skip
        """The columns side by side (``COLUMNS`` order, counts as floats): a page reads
        the units it shows as one gather instead of one per column."""
        n = len(self.index)
        self.dense = n == 0 or (int(self.index[0]) == 0 and int(self.index[-1]) == n - 1)
        """Every unit 0..n-1 has statistics (the usual case): a unit's row is its index."""
        self._orders: dict[tuple[str, bool], np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def records(self, indices: Sequence[int]) -> list[list[float] | None]:
        """Each unit's ``COLUMNS`` values (None where the harvest has no statistics)."""
        rows = self.rows(indices)
        if not len(rows):
            return []
        if not len(self.index):
            return [None] * len(rows)
        values = self.table[np.maximum(rows, 0)].tolist()
        return [v if r >= 0 else None for v, r in zip(values, rows.tolist(), strict=True)]

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """Row of each unit index (-1 where the harvest has no statistics for it)."""
        want = np.asarray(indices, dtype=np.int64)
        if self.dense:
            return np.where((want >= 0) & (want < len(self.index)), want, -1)
        pos = np.searchsorted(self.index, want)
        pos = np.minimum(pos, max(len(self.index) - 1, 0))
        found = (self.index[pos] == want) if len(self.index) else np.zeros(len(want), bool)
        return np.where(found, pos, -1)

    def order(self, key: SortKey, descending: bool) -> np.ndarray:
        """Rows sorted by ``key`` (ties by index ascending either way, as the SQL lists
        sort); NaN ranks above every number, as PostgreSQL sorts it."""
        cache = (key, descending)
        with self._lock:
            found = self._orders.get(cache)
        if found is not None:
            return found
        n = len(self.index)
        if key == "index":
            rows = np.arange(n)[::-1] if descending else np.arange(n)
        else:
            values = self.frequency if key == "frequency" else self.max_value
            nan = np.isnan(values)
            filled = np.where(nan, 0.0, values)
            if descending:
                rows = np.lexsort((self.index, -filled, ~nan))
            else:
                rows = np.lexsort((self.index, filled, nan))
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        with self._lock:
            self._orders[cache] = rows
        return rows

    def select(
        self,
        key: SortKey,
        descending: bool,
        *,
        min_frequency: float | None = None,
        max_frequency: float | None = None,
        index_range: range | None = None,
    ) -> np.ndarray:
        """Rows matching the filters (frequency range inclusive, unit indices in a range),
        in sort order."""
        rows = self.order(key, descending)
        if min_frequency is None and max_frequency is None and index_range is None:
            return rows
        keep = np.ones(len(self.index), dtype=bool)
        if min_frequency is not None:
            keep &= self.frequency >= min_frequency
        if max_frequency is not None:
            keep &= self.frequency <= max_frequency
        if index_range is not None:
            keep &= (self.index >= index_range.start) & (self.index < index_range.stop)
        return rows[keep[rows]]


NEIGHBOURS_KEPT = 16
"""Neighbour indices kept per latent (a harvest stores 10 by default)."""


class UnitSummaries:
    """``KindSummary`` of every unit kind of one harvest, and each latent's decoder
    neighbours (indices, -1 padded), so that a latent page knows every unit it shows
    before it asks the database for their explanations."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.kinds: dict[int, KindSummary] = {}
        if rows:
            cols = list(zip(*rows, strict=True))
            kind = np.asarray(cols[0], dtype=np.int64)
            index = np.asarray(cols[1], dtype=np.int64)
            data = {
                name: np.asarray([np.nan if v is None else v for v in cols[2 + i]], np.float64)
                for i, name in enumerate(KindSummary.COLUMNS)
            }
        for k in UnitKind:
            if rows:
                mask = kind == int(k)
                part = KindSummary(index[mask], {c: v[mask] for c, v in data.items()})
            else:
                empty = np.zeros(0, np.float64)
                part = KindSummary(np.zeros(0, np.int64), dict.fromkeys(KindSummary.COLUMNS, empty))
            self.kinds[int(k)] = part
        latents = self.kinds[int(UnitKind.LATENT)]
        self.neighbours = np.full((len(latents), NEIGHBOURS_KEPT), -1, dtype=np.int64)
        if rows:
            lists = cols[2 + len(KindSummary.COLUMNS)]
            which = [n for n, (k, v) in enumerate(zip(cols[0], lists, strict=True))
                     if k == int(UnitKind.LATENT) and v]  # fmt: skip
            at = latents.rows([cols[1][n] for n in which]).tolist()
            for n, row in zip(which, at, strict=True):
                found = [int(p[0]) for p in json_value(lists[n])[:NEIGHBOURS_KEPT]
                         if isinstance(p, list | tuple) and p and isinstance(p[0], int | float)]  # fmt: skip
                self.neighbours[row, : len(found)] = found
        self.units = len(rows)

    def kind(self, unit_kind: int) -> KindSummary:
        return self.kinds[int(unit_kind)]

    def neighbours_of(self, index: int) -> list[int]:
        """The latent's decoder neighbours as stored (empty when unknown)."""
        row = int(self.kinds[int(UnitKind.LATENT)].rows([index])[0])
        if row < 0:
            return []
        return [n for n in self.neighbours[row].tolist() if n >= 0]


SUMMARY_CACHE_UNITS = 8_000_000
"""Units whose summaries are kept, all harvests together (about 70 bytes a unit: a few
hundred MB at most, a few MB for the usual SAEs of 16k-130k latents)."""
VOCAB_CACHE_SIZE = 8
"""Harvests whose vocabularies are kept (each is the distinct tokens of one corpus)."""
CONTEXT_CACHE_SIZE = 16_384
"""Contexts whose token strings are kept decoded."""

SAE_CACHE_SIZE = 1024
"""SAE rows remembered by slug (each page checks its row is still current, in the same
round trip as its other reads)."""

_saes = _LRU(SAE_CACHE_SIZE)
_summaries = _LRU(SUMMARY_CACHE_UNITS, weigh=lambda s: max(1, s.units))
_vocabs = _LRU(VOCAB_CACHE_SIZE)
_contexts = _LRU(CONTEXT_CACHE_SIZE)


def clear_cache() -> None:
    for cache in (_saes, _summaries, _vocabs, _contexts):
        cache.clear()


def remembered_sae(reader: RawReader, slug: str) -> SaeRef | None:
    """The SAE row last read for ``slug`` (it may have changed since: check it)."""
    return _saes.peek((reader.database, slug))


def remember_sae(reader: RawReader, slug: str, sae: SaeRef | None) -> None:
    """Remember (or, with None, forget) the current row of ``slug``."""
    _saes.put((reader.database, slug), sae)


def harvest_key(reader: RawReader, sae: SaeRef) -> HarvestKey | None:
    """What identifies the SAE's active harvest's data (None without one)."""
    if sae.active_harvest_id is None:
        return None
    return reader.database, sae.active_harvest_id, sae.harvest_finished_at


def summaries(reader: RawReader, key: HarvestKey) -> UnitSummaries:
    """Every unit's scalar statistics of the harvest ``key`` names."""
    return _summaries.get_or_make(
        key,
        lambda: UnitSummaries(pages_repo.unit_summaries(reader, key[1])),
        cache=key[2] is not None,
    )


def vocabulary(reader: RawReader, key: HarvestKey) -> dict[int, str]:
    """Every token string the harvest stored, by id."""
    return _vocabs.get_or_make(
        key, lambda: pages_repo.token_strings(reader, key[1]), cache=key[2] is not None
    )


def context_tokens(
    key: HarvestKey, context_id: int, token_ids: bytes, vocab: dict[int, str]
) -> tuple[str, ...]:
    """A context's token strings (ids the harvest did not store show as ``<id>``)."""
    found = _contexts.peek((key, context_id)) if key[2] is not None else None
    if found is not None:
        return found  # type: ignore[no-any-return]

    def decode() -> tuple[str, ...]:
        return tuple(vocab.get(t, f"<{t}>") for t in unpack_i32(bytes(token_ids)).tolist())

    return _contexts.get_or_make((key, int(context_id)), decode, cache=key[2] is not None)
