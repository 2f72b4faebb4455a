"""Bulk writes: COPY on PostgreSQL, executemany on SQLite; values survive unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from kronscope.db.codec import pack_f16, unpack_f16, unpack_i64
from kronscope.db.models import Example, ExampleKind, Sae, UnitKind, UnitStats
from kronscope.db.repositories import bulk_insert, examples, harvests, stats


@pytest.fixture
def copy_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the SQL of every psycopg ``cursor.copy()`` call."""
    import psycopg

    calls: list[str] = []
    original = psycopg.Cursor.copy

    def spy(self: Any, statement: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(statement))
        return original(self, statement, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "copy", spy)
    return calls


def test_bulk_insert_10k_examples(
    db_session: Session, make_sae: Callable[..., Sae], copy_spy: list[str]
) -> None:
    sae = make_sae(db_session)
    harvest = harvests.create_harvest(db_session, sae.id, corpus_name="c", n_tokens=1, ctx_len=64)
    ctx = examples.add_contexts(db_session, harvest.id, [(0, np.arange(64))])[0]
    rng = np.random.default_rng(0)
    values = rng.random((10_000, 64), dtype=np.float32) * 20
    rows = (
        examples.ExampleRow(
            unit_kind=UnitKind.LATENT,
            unit_index=i // 4,
            kind=ExampleKind.TOP,
            rank=i % 4,
            context_id=ctx,
            values=values[i],
        )
        for i in range(10_000)
    )
    start = time.perf_counter()
    copy_spy.clear()
    assert examples.add_examples(db_session, harvest.id, rows) == 10_000
    elapsed = time.perf_counter() - start
    if db_session.get_bind().dialect.name == "postgresql":
        assert len(copy_spy) == 1 and copy_spy[0].startswith("COPY example (")
    else:
        assert copy_spy == []
    print(f"{db_session.get_bind().dialect.name}: 10k examples in {elapsed:.3f}s")

    count = db_session.scalar(
        sa.select(sa.func.count()).select_from(Example).where(Example.harvest_id == harvest.id)
    )
    assert count == 10_000
    row = db_session.execute(
        sa.select(Example).where(
            Example.harvest_id == harvest.id, Example.unit_index == 1234, Example.rank == 2
        )
    ).scalar_one()
    expected = values[1234 * 4 + 2]
    assert row.values == pack_f16(expected)
    np.testing.assert_allclose(unpack_f16(row.values), expected, rtol=1e-3, atol=1e-2)
    assert row.max_pos == int(np.argmax(expected))
    assert row.max_value == pytest.approx(float(expected.max()), rel=1e-6)  # float32, not f16


def test_bulk_insert_stats_with_json_numpy_and_nulls(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    harvest = harvests.create_harvest(db_session, sae.id, corpus_name="c", n_tokens=1, ctx_len=8)
    stats.add_stats(
        db_session,
        harvest.id,
        [
            {
                "unit_kind": 0,
                "unit_index": np.int64(3),
                "n_active": np.int64(12),
                "frequency": np.float32(0.25),
                "max_value": 4.5,
                "histogram": np.array([1, 2, 2**40]),
                "histogram_edges": [0.0, 0.5, 1.0, 1.5],
                "logit_effects": {"top": [['é"\\', 1.5]], "bottom": []},
                "neighbours": [[4, 0.9], [7, 0.5]],
            },
            {"unit_kind": 0, "unit_index": 4, "n_active": 0, "frequency": 0.0, "max_value": 0.0},
        ],
    )
    db_session.expire_all()
    s3 = db_session.get(UnitStats, (harvest.id, 0, 3))
    s4 = db_session.get(UnitStats, (harvest.id, 0, 4))
    assert s3 is not None and s4 is not None
    assert s3.n_active == 12 and s3.frequency == pytest.approx(0.25)
    np.testing.assert_array_equal(unpack_i64(s3.histogram or b""), [1, 2, 2**40])
    assert s3.histogram_edges == [0.0, 0.5, 1.0, 1.5]
    assert s3.logit_effects == {"top": [['é"\\', 1.5]], "bottom": []}
    assert s3.neighbours == [[4, 0.9], [7, 0.5]]
    assert s4.histogram is None and s4.logit_effects is None and s4.mean_value is None
    # SQL NULL, not the JSON literal null
    is_null = db_session.scalar(
        sa.select(sa.func.count())
        .select_from(UnitStats)
        .where(UnitStats.harvest_id == harvest.id, UnitStats.neighbours.is_(None))
    )
    assert is_null == 1


def test_bulk_insert_edge_cases(db_session: Session) -> None:
    assert bulk_insert(db_session, UnitStats, []) == 0
    with pytest.raises(ValueError):
        bulk_insert(db_session, UnitStats, [{"no_such_column": 1}])
    with pytest.raises(TypeError):
        bulk_insert(db_session, object, [{"x": 1}])  # type: ignore[arg-type]


def test_tokens_and_contexts_are_idempotent(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    harvest = harvests.create_harvest(db_session, sae.id, corpus_name="c", n_tokens=1, ctx_len=4)
    assert examples.add_tokens(db_session, harvest.id, {1: "a", 2: " b"}) == 2
    assert examples.add_tokens(db_session, harvest.id, {2: " b", 3: "\n"}) == 1
    first = examples.add_contexts(db_session, harvest.id, [(0, [1, 2, 3, 1]), (4, [2, 2, 2, 2])])
    again = examples.add_contexts(db_session, harvest.id, [(4, [9, 9, 9, 9]), (8, [3, 3, 3, 3])])
    assert (
        again[4] == first[4] and 8 in again and len(set(again.values()) | set(first.values())) == 3
    )
    assert examples.token_strings(db_session, harvest.id, [1, 2, 3, 99]) == {
        1: "a",
        2: " b",
        3: "\n",
    }
