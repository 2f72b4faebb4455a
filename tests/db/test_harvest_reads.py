"""What the feature pages cache of finished harvests (``services.harvest_reads``): every
unit's summary and sort orders (against the database's own lists), neighbours, the LRU."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session

from helpers.db import write_fake_harvest
from kronscope.db.models import Sae, UnitKind
from kronscope.db.raw import RawReader
from kronscope.db.repositories import pages, stats
from kronscope.services import harvest_reads
from kronscope.services.harvest_reads import KindSummary


@pytest.fixture
def kron(db_session: Session, make_sae: Callable[..., Sae]) -> Sae:
    sae = make_sae(db_session)  # F = 32 latents, 8 base and 16 extension parents
    write_fake_harvest(db_session, sae, seed=5)
    db_session.refresh(sae)
    return sae


def _summaries(session: Session, sae: Sae) -> harvest_reads.UnitSummaries:
    reader = RawReader.of(session)
    ref = pages.sae_by_slug(reader, sae.slug)
    assert ref is not None
    key = harvest_reads.harvest_key(reader, ref)
    assert key is not None
    return harvest_reads.summaries(reader, key)


@pytest.mark.parametrize("sort", ["index", "frequency", "max_value"])
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize(
    "filters",
    [{}, {"min_frequency": 0.02}, {"max_frequency": 0.05, "min_frequency": 0.01}, {"head": 2}],
)
def test_lists_equal_the_database(
    db_session: Session, kron: Sae, sort: Any, descending: bool, filters: dict[str, Any]
) -> None:
    part = _summaries(db_session, kron).kind(UnitKind.LATENT)
    head = filters.get("head")
    index_range = None if head is None else range(head * 8, head * 8 + 8)
    rows = part.select(
        sort,
        descending,
        min_frequency=filters.get("min_frequency"),
        max_frequency=filters.get("max_frequency"),
        index_range=index_range,
    )
    want = stats.list_units(
        db_session, kron, sort=sort, descending=descending, limit=1000, **filters
    )
    assert part.index[rows].tolist() == [r.unit_index for r in want.items]
    assert len(rows) == want.total


def test_summary_values_and_lookups(db_session: Session, kron: Sae) -> None:
    summaries = _summaries(db_session, kron)
    assert summaries.units == 32 + 8 + 16
    for kind, size in [(UnitKind.LATENT, 32), (UnitKind.BASE, 8), (UnitKind.EXTENSION, 16)]:
        part = summaries.kind(kind)
        assert len(part) == size
        briefs = stats.unit_briefs(db_session, kron, [(kind, i) for i in range(size)])
        rows = part.rows(list(range(size)))
        for i, r in enumerate(rows.tolist()):
            b = briefs[(int(kind), i)]
            assert (part.n_active[r], part.frequency[r], part.max_value[r]) == (
                b.n_active,
                b.frequency,
                b.max_value,
            )
            assert np.isnan(part.both_parents_active[r])  # not written by the fake harvest
    assert summaries.kind(UnitKind.LATENT).rows([31, 32, -1, 0]).tolist() == [31, -1, -1, 0]


def test_neighbours_from_the_stored_lists(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    hid = write_fake_harvest(db_session, sae, complete=False)
    from kronscope.db.models import UnitStats

    row = db_session.get(UnitStats, (hid, 0, 3))
    assert row is not None
    row.neighbours = [[7, 0.9], [30, 0.5], ["bad", 1.0], [2, 0.1]]
    db_session.flush()
    from kronscope.db.repositories import harvests

    harvests.mark_complete(db_session, hid)
    db_session.refresh(sae)
    summaries = _summaries(db_session, sae)
    assert summaries.neighbours_of(3) == [7, 30, 2]
    assert summaries.neighbours_of(4) == [] and summaries.neighbours_of(999) == []


def test_cached_per_finished_harvest_only(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    hid = write_fake_harvest(db_session, sae)
    db_session.refresh(sae)
    reader = RawReader.of(db_session)
    ref = pages.sae_by_slug(reader, sae.slug)
    assert ref is not None
    key = harvest_reads.harvest_key(reader, ref)
    assert key is not None and key[1] == hid and key[2] is not None
    first = harvest_reads.summaries(reader, key)
    assert harvest_reads.summaries(reader, key) is first  # cached
    unfinished = (key[0], key[1], None)
    assert harvest_reads.summaries(reader, unfinished) is not harvest_reads.summaries(
        reader, unfinished
    )
    assert harvest_reads.vocabulary(reader, key) is harvest_reads.vocabulary(reader, key)


def test_nan_sorts_like_postgresql() -> None:
    columns = {name: np.zeros(4) for name in KindSummary.COLUMNS}
    columns["frequency"] = np.array([0.2, np.nan, 0.1, 0.2])
    part = KindSummary(np.array([3, 0, 1, 2]), columns)  # rows sorted by index: 0 1 2 3
    assert part.index[part.order("frequency", False)].tolist() == [1, 2, 3, 0]
    assert part.index[part.order("frequency", True)].tolist() == [0, 2, 3, 1]
    assert part.index[part.order("index", True)].tolist() == [3, 2, 1, 0]


def test_lru_weight_and_single_flight() -> None:
    lru = harvest_reads._LRU(10, weigh=len)
    assert lru.get_or_make("a", lambda: "x" * 6) == "x" * 6
    lru.get_or_make("b", lambda: "y" * 3)
    lru.get_or_make("c", lambda: "z" * 3)  # 12 > 10: "a" goes
    assert lru.peek("a") is None and lru.peek("b") == "yyy"
    lru.get_or_make("big", lambda: "w" * 11)  # never stored
    assert lru.peek("big") is None
    lru.put("b", None)
    assert lru.peek("b") is None

    calls: list[int] = []

    def slow() -> str:
        calls.append(1)
        time.sleep(0.2)
        return "made"

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(lru.get_or_make("k", slow)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["made"] * 4 and len(calls) == 1

    def failing() -> str:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        lru.get_or_make("f", failing)
    assert lru.get_or_make("f", lambda: "ok") == "ok"  # a failure is not remembered


@pytest.mark.parametrize("dense", [True, False])
def test_records_gather_every_column(dense: bool) -> None:
    index = np.arange(6) if dense else np.array([0, 2, 3, 7, 8, 9])
    columns = {
        c: np.arange(6, dtype=np.float64) * (k + 1) for k, c in enumerate(KindSummary.COLUMNS)
    }
    part = KindSummary(index[::-1].copy(), {c: v[::-1].copy() for c, v in columns.items()})
    assert part.dense is dense
    want = [5, 0, 3, 11, -1] if dense else [9, 0, 3, 11, -1]
    records = part.records(want)
    for i, rec in zip(want, records, strict=True):
        where = np.flatnonzero(index == i)
        if not where.size:
            assert rec is None and part.rows([i])[0] == -1
            continue
        row = int(where[0])
        assert rec == [float(columns[c][row]) for c in KindSummary.COLUMNS]
    assert part.records([]) == []


def test_records_of_an_empty_summary() -> None:
    empty = np.zeros(0, np.float64)
    part = KindSummary(np.zeros(0, np.int64), dict.fromkeys(KindSummary.COLUMNS, empty))
    assert part.records([0, 3]) == [None, None]
