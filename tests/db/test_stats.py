"""Latent list (sort, filter, paginate), head grid and lookups; checked against plain Python."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session

from helpers.db import write_fake_harvest
from kronscope.db.models import Sae, UnitKind, UnitStats
from kronscope.db.repositories import explanations, harvests, stats


def _reference(rows: list[UnitStats], key: str, descending: bool) -> list[int]:
    if key == "index":
        return sorted((r.unit_index for r in rows), reverse=descending)
    sign = -1 if descending else 1
    return [
        r.unit_index for r in sorted(rows, key=lambda r: (sign * getattr(r, key), r.unit_index))
    ]


@pytest.fixture
def kron(db_session: Session, make_sae: Callable[..., Sae]) -> Sae:
    # F = h*m*n = 4*2*4 = 32 latents, 8 base and 16 extension parents
    sae = make_sae(db_session)
    write_fake_harvest(db_session, sae, seed=3)
    return sae


@pytest.mark.parametrize("sort", ["index", "frequency", "max_value"])
@pytest.mark.parametrize("descending", [False, True])
def test_sort_and_paginate(db_session: Session, kron: Sae, sort: Any, descending: bool) -> None:
    everything = stats.list_units(db_session, kron, limit=1000).items
    assert len(everything) == 32
    expected = _reference(everything, sort, descending)
    got: list[int] = []
    for offset in range(0, 40, 7):
        page = stats.list_units(
            db_session, kron, sort=sort, descending=descending, limit=7, offset=offset
        )
        assert page.total == 32
        got += [u.unit_index for u in page.items]
    assert got == expected


def test_filters(db_session: Session, kron: Sae) -> None:
    rows = stats.list_units(db_session, kron, limit=1000).items
    freqs = sorted({r.frequency for r in rows})
    lo, hi = freqs[len(freqs) // 4], freqs[3 * len(freqs) // 4]
    page = stats.list_units(db_session, kron, min_frequency=lo, max_frequency=hi, limit=1000)
    assert {u.unit_index for u in page.items} == {
        r.unit_index for r in rows if lo <= r.frequency <= hi
    }
    assert page.total == len(page.items)

    head2 = stats.list_units(db_session, kron, head=2, sort="frequency", limit=1000)
    assert sorted(u.unit_index for u in head2.items) == list(range(16, 24))  # m*n = 8 per head
    base_head1 = stats.list_units(db_session, kron, unit_kind=UnitKind.BASE, head=1, limit=100)
    assert [u.unit_index for u in base_head1.items] == [2, 3]  # g*m + i
    ext_head1 = stats.list_units(db_session, kron, unit_kind=UnitKind.EXTENSION, head=1, limit=100)
    assert [u.unit_index for u in ext_head1.items] == [4, 5, 6, 7]  # g*n + j
    with pytest.raises(ValueError):
        stats.list_units(db_session, kron, head=4)

    explanations.create_explanation(db_session, kron.id, UnitKind.LATENT, 5, "commas in lists")
    explanations.create_explanation(db_session, kron.id, UnitKind.LATENT, 9, "closing brackets")
    gone = explanations.create_explanation(db_session, kron.id, UnitKind.LATENT, 11, "deleted one")
    explanations.delete_explanation(db_session, gone.id)
    explanations.create_explanation(db_session, kron.id, UnitKind.BASE, 6, "a base parent")
    explained = stats.list_units(db_session, kron, has_explanation=True)
    assert [u.unit_index for u in explained.items] == [5, 9] and explained.total == 2
    unexplained = stats.list_units(db_session, kron, has_explanation=False, limit=1000)
    assert unexplained.total == 30 and {5, 9}.isdisjoint(u.unit_index for u in unexplained.items)

    assert [u.unit_index for u in stats.list_units(db_session, kron, q="comma").items] == [5]
    assert [
        u.unit_index for u in stats.list_units(db_session, kron, q="bracket OR commas").items
    ] == [5, 9]
    assert stats.list_units(db_session, kron, q="deleted").total == 0
    assert stats.list_units(db_session, kron, q="😀").total == 0
    combined = stats.list_units(db_session, kron, head=0, has_explanation=True, q="commas")
    assert [u.unit_index for u in combined.items] == [5]
    assert stats.list_units(db_session, kron, head=1, q="commas").total == 0


def test_lookups_and_head_grid(db_session: Session, kron: Sae) -> None:
    one = stats.get_unit_stats(db_session, kron, UnitKind.LATENT, 13)
    assert one is not None and one.unit_index == 13 and one.histogram_edges == [0.0, 1.0, 2.0, 3.0]
    assert stats.get_unit_stats(db_session, kron, UnitKind.LATENT, 999) is None
    siblings = stats.stats_for_units(db_session, kron, UnitKind.LATENT, [8, 9, 10, 11, 999])
    assert sorted(siblings) == [8, 9, 10, 11]
    parents = stats.stats_for_units(db_session, kron, UnitKind.EXTENSION, [0, 15])
    assert sorted(parents) == [0, 15]
    grid = stats.head_grid(db_session, kron, 3)
    assert [u.unit_index for u in grid] == list(range(24, 32))


def test_unit_briefs_across_kinds(db_session: Session, kron: Sae) -> None:
    """One query for a latent's siblings, parents and neighbours: the same numbers as the
    full rows, keyed by (kind, index); unknown units are absent."""
    keys = [
        (UnitKind.LATENT, 9),
        (UnitKind.LATENT, 30),
        (UnitKind.BASE, 7),
        (UnitKind.EXTENSION, 0),
    ]
    briefs = stats.unit_briefs(db_session, kron, [*keys, (UnitKind.LATENT, 999)])
    assert sorted(briefs) == sorted((int(k), i) for k, i in keys)
    for kind, index in keys:
        full = stats.get_unit_stats(db_session, kron, kind, index)
        brief = briefs[(int(kind), index)]
        assert full is not None
        for column in ("n_active", "frequency", "mean_value", "max_value", "both_parents_active"):
            assert getattr(brief, column) == getattr(full, column), column
    assert stats.unit_briefs(db_session, kron, []) == {}


def test_list_total_given_or_counted(db_session: Session, kron: Sae) -> None:
    counted = stats.list_units(db_session, kron, min_frequency=0.2, limit=5)
    assert counted.total == stats.count_units(db_session, kron, min_frequency=0.2)
    assert counted.total == len(
        stats.list_units(db_session, kron, min_frequency=0.2, limit=100).items
    )
    given = stats.list_units(db_session, kron, min_frequency=0.2, limit=5, total=counted.total)
    assert given == counted
    assert stats.count_units(db_session, kron, head=1) == 8
    assert stats.head_range(kron, UnitKind.LATENT, 3) == range(24, 32)


def test_non_kronsae_has_no_heads(db_session: Session, make_sae: Callable[..., Sae]) -> None:
    sae = make_sae(db_session, architecture="topk", h=None, m=None, n=None, d_sae=16)
    write_fake_harvest(db_session, sae)
    assert stats.list_units(db_session, sae, limit=100).total == 16
    assert stats.list_units(db_session, sae, unit_kind=UnitKind.BASE).total == 0
    with pytest.raises(ValueError):
        stats.head_grid(db_session, sae, 0)


def test_latent_list_at_65k_is_index_backed(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    f = 65_536
    sae = make_sae(db_session, d_sae=f, h=8192, m=2, n=4)
    h = harvests.create_harvest(db_session, sae.id, corpus_name="c", n_tokens=10**6, ctx_len=64)
    rng = np.random.default_rng(0)
    freq = rng.random(f) ** 4
    maxv = rng.gamma(2.0, 3.0, size=f)
    stats.add_stats(
        db_session,
        h.id,
        (
            {
                "unit_kind": 0,
                "unit_index": i,
                "n_active": int(freq[i] * 10**6),
                "frequency": float(freq[i]),
                "max_value": float(maxv[i]),
            }
            for i in range(f)
        ),
    )
    harvests.mark_complete(db_session, h.id)
    dialect = db_session.get_bind().dialect.name
    if dialect == "postgresql":
        db_session.execute(__import__("sqlalchemy").text("ANALYZE unit_stats"))

    start = time.perf_counter()
    page = stats.list_units(
        db_session, sae, sort="frequency", descending=True, limit=50, offset=100
    )
    by_max = stats.list_units(db_session, sae, sort="max_value", limit=50, min_frequency=0.5)
    grid = stats.head_grid(db_session, sae, 4000)
    elapsed = time.perf_counter() - start
    assert page.total == f
    assert [u.unit_index for u in page.items] == list(np.argsort(-freq, kind="stable")[100:150])
    expected = [i for i in np.argsort(maxv, kind="stable") if freq[i] >= 0.5][:50]
    assert [u.unit_index for u in by_max.items] == expected
    assert [u.unit_index for u in grid] == list(range(32_000, 32_008))
    assert elapsed < 2.0, f"three page queries took {elapsed:.2f}s at F=65k"

    if dialect == "sqlite":
        import sqlalchemy as sa

        from kronscope.db.models import UnitStats as US

        # The page of the list is found from the sort index alone: no table rows on the
        # way to the offset, no sort.
        for key, descending in [(US.frequency, True), (US.max_value, False)]:
            stmt = (
                sa.select(US.unit_index)
                .where(US.harvest_id == h.id, US.unit_kind == 0)
                .order_by(key.desc() if descending else key, US.unit_index)
                .limit(50)
                .offset(60_000)
            )
            compiled = stmt.compile(
                dialect=db_session.get_bind().dialect, compile_kwargs={"literal_binds": True}
            )
            plan = " ".join(
                str(r[-1]) for r in db_session.execute(sa.text(f"EXPLAIN QUERY PLAN {compiled}"))
            )
            index = f"ix_unit_stats_{key.key}_{'desc' if descending else 'asc'}"
            assert f"COVERING INDEX {index}" in plan and "TEMP B-TREE" not in plan, plan
