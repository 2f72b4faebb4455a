"""Reads on the driver's connection (``db.raw``) and the pages' statements
(``repositories.pages``), on SQLite and PostgreSQL, against the SQLAlchemy repositories."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from helpers.db import write_fake_harvest
from kronscope.db import DatabaseUnavailable, make_engine
from kronscope.db.codec import pack_f16
from kronscope.db.models import ExampleKind, Sae, UnitKind
from kronscope.db.raw import RawQuery, RawReader, json_value, utc
from kronscope.db.repositories import examples, explanations, harvests, pages, stats


def test_rendering_per_dialect() -> None:
    q = RawQuery("SELECT a FROM t WHERE b = :b AND c IN :cs AND d LIKE '%x' AND e::text = 'y'")
    assert q.lists == {"cs"}
    assert q.postgresql == (
        "SELECT a FROM t WHERE b = %(b)s AND c = ANY(%(cs)s::integer[]) AND d LIKE '%%x' "
        "AND e::text = 'y'"
    )
    assert q.sqlite == (
        "SELECT a FROM t WHERE b = :b AND c IN (SELECT value FROM json_each(:cs)) "
        "AND d LIKE '%x' AND e::text = 'y'"
    )
    with pytest.raises(ValueError, match="unsupported"):
        q.render("mysql")


def test_converters() -> None:
    assert utc(None) is None
    assert utc("2026-12-02 16:25:00.123456") == datetime(2026, 12, 2, 16, 25, 0, 123456, UTC)
    aware = datetime(2026, 12, 2, 17, 25, tzinfo=datetime.now().astimezone().tzinfo)
    assert utc(aware) == aware and utc(aware).tzinfo is UTC  # type: ignore[union-attr]
    assert json_value('{"a": [1, 2]}') == {"a": [1, 2]}
    assert json_value([1, 2]) == [1, 2] and json_value(None) is None


def test_lists_and_batches(db_session: Session, make_sae: Callable[..., Sae]) -> None:
    sae = make_sae(db_session)
    hid = write_fake_harvest(db_session, sae)
    reader = RawReader.of(db_session)
    q = RawQuery(
        "SELECT unit_index FROM unit_stats WHERE harvest_id = :h AND unit_kind = 0 "
        "AND unit_index IN :units ORDER BY unit_index"
    )
    assert reader.all(q, h=hid, units=[7, 3, 31, 99]) == [(3,), (7,), (31,)]
    assert reader.all(q, h=hid, units=[]) == []
    assert reader.one(q, h=hid, units=[]) is None
    both = reader.batch([(q, {"h": hid, "units": [1]}), (q, {"h": hid, "units": [2, 4]})])
    assert both == [[(1,)], [(2,), (4,)]]
    assert reader.batch([]) == []
    with pytest.raises(Exception, match="no_such_column"):  # the driver's own error
        reader.all(RawQuery("SELECT no_such_column FROM unit_stats"))


def _max_seq(session: Session, sae: Sae) -> int:
    from kronscope.db.models import Explanation

    found = session.scalar(
        sa.select(sa.func.max(Explanation.seq)).where(Explanation.sae_id == sae.id)
    )
    return int(found or 0)


def test_page_reads_equal_the_repositories(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    hid = write_fake_harvest(db_session, sae, top_per_unit=3, samples_per_unit=2)
    explanations.create_explanation(db_session, sae.id, 0, 5, "first", source="human", score=0.5)
    explanations.create_explanation(db_session, sae.id, 0, 5, "better", source="human", score=0.9)
    explanations.create_explanation(db_session, sae.id, 1, 2, "a base parent", source="human")
    gone = explanations.create_explanation(db_session, sae.id, 0, 6, "deleted", source="human")
    explanations.delete_explanation(db_session, gone.id)
    db_session.refresh(sae)
    reader = RawReader.of(db_session)

    ref = pages.sae_by_slug(reader, sae.slug)
    assert ref is not None and ref.id == sae.id and ref.active_harvest_id == hid
    assert ref.is_kronsae and ref.harvest_status == "complete"
    harvest = harvests.get_harvest(db_session, hid)
    assert harvest is not None and ref.harvest_finished_at == harvest.finished_at
    assert pages.sae_by_slug(reader, "no-such-sae") is None
    assert pages.sae_and_seq_by_slug(reader, sae.slug) == (ref, _max_seq(db_session, sae))

    def unit_page(kind: int, index: int, kinds: list[int], slug: str = sae.slug) -> Any:
        statement = pages.unit_page_statement(slug, hid, kind, index, kinds)
        return pages.unit_page_from_rows(reader.batch([statement])[0])

    for kind, index in [(UnitKind.LATENT, 5), (UnitKind.BASE, 2), (UnitKind.EXTENSION, 7)]:
        sae_rows, row, rows = unit_page(kind, index, [0, 1])
        assert pages.sae_from_rows(sae_rows) == ref
        want = stats.get_unit_stats(db_session, sae, kind, index)
        assert row is not None and want is not None
        assert (row.n_active, row.frequency, row.max_value, row.histogram) == (
            want.n_active,
            want.frequency,
            want.max_value,
            want.histogram,
        )
        assert row.histogram_edges == want.histogram_edges
        top = examples.top_examples(db_session, sae, kind, index)
        sampled = examples.sampled_examples(db_session, sae, kind, index)
        assert [(r[0], r[1], r[7], bytes(r[6])) for r in rows] == [
            (int(ExampleKind.TOP), v.rank, v.context_id, pack_f16(v.values)) for v in top
        ] + [(int(ExampleKind.SAMPLE), v.rank, v.context_id, pack_f16(v.values)) for v in sampled]
        assert [r[0] for r in unit_page(kind, index, [1])[2]] == [1, 1]
        assert unit_page(kind, index, [])[2] == []
    sae_rows, row, rows = unit_page(0, 10_000, [0, 1])
    assert pages.sae_from_rows(sae_rows) == ref and row is None and rows == []
    assert unit_page(0, 5, [0, 1], slug="no-such-sae") == ([], None, [])

    found = pages.explanations(reader, sae.id, [(0, 5), (0, 6), (1, 2), (2, 2)])
    assert [e.text for e in found[(0, 5)]] == ["better", "first"]  # best score first
    assert [e.text for e in found[(1, 2)]] == ["a base parent"]
    assert (0, 6) not in found and (2, 2) not in found  # deleted; none
    first = found[(0, 5)][0]
    assert first.created_at.tzinfo is UTC and first.score == 0.9
    assert pages.explanations(reader, sae.id, []) == {}

    vocab = pages.token_strings(reader, hid)
    assert vocab[3] == "tok3" and len(vocab) == 50
    summaries = pages.unit_summaries(reader, hid)
    assert len(summaries) == 32 + 8 + 16


def test_unit_status_without_harvest(db_session: Session, make_sae: Callable[..., Sae]) -> None:
    sae = make_sae(db_session)
    reader = RawReader.of(db_session)
    ref = pages.sae_by_slug(reader, sae.slug)
    assert ref is not None and ref.harvest_status == "none" and ref.harvest_finished_at is None
    write_fake_harvest(db_session, sae, complete=False)
    ref = pages.sae_by_slug(reader, sae.slug)
    assert ref is not None and ref.harvest_status == "running" and ref.active_harvest_id is None


@pytest.mark.postgres
def test_a_dropped_connection_is_unavailable_and_replaced(db_url: str) -> None:
    """The server ends a pooled connection: its read fails as 'unavailable' (HTTP 503, with
    ``broken_connection`` so a read can be retried), and the pool opens fresh ones."""
    if not db_url.startswith("postgresql"):
        pytest.skip("needs a server that can end a connection")
    engine: Engine = make_engine(db_url, pool_size=2)
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            conn.commit()
        with make_engine(db_url).connect() as admin:
            admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")  # type: ignore[arg-type]
            admin.commit()
        with engine.connect() as conn:  # the same pooled connection, just handed out
            reader = RawReader(conn)
            with pytest.raises(DatabaseUnavailable) as caught:
                reader.all(RawQuery("SELECT 1"))
            assert getattr(caught.value, "broken_connection", False)
        with engine.connect() as conn:
            assert RawReader(conn).all(RawQuery("SELECT 2")) == [(2,)]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_an_idle_connection_is_pinged_before_use(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that sat in the pool past ``PING_IDLE_S`` and was dropped by the server
    is replaced at checkout: the request using it never sees the failure."""
    if not db_url.startswith("postgresql"):
        pytest.skip("needs a server that can end a connection")
    from kronscope.db import engine as engine_mod

    monkeypatch.setattr(engine_mod, "PING_IDLE_S", 0.0)
    engine: Engine = make_engine(db_url, pool_size=1)
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            conn.commit()
        with make_engine(db_url).connect() as admin:
            admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")  # type: ignore[arg-type]
            admin.commit()
        with engine.connect() as conn:
            assert RawReader(conn).all(RawQuery("SELECT pg_backend_pid()"))[0][0] != pid
    finally:
        engine.dispose()


def test_json_values_orjson_reads_and_json_reads_the_rest() -> None:
    assert json_value(b"[[3, 0.5]]") == [[3, 0.5]]
    nan = json_value("[NaN]")  # SQLite text a lenient writer left: orjson refuses it
    assert len(nan) == 1 and nan[0] != nan[0]


def test_pooled_reader_reads_outside_a_transaction(db_url: str) -> None:
    """``RawReader.pooled``: statements run as they come (no transaction), the connection
    goes back to the pool as the pool's other users expect it (PostgreSQL: not autocommit),
    and the reader can open an ORM session when a read needs one."""
    engine: Engine = make_engine(db_url, pool_size=1)
    try:
        with RawReader.pooled(engine) as reader:
            assert reader.all(RawQuery("SELECT 1")) == [(1,)]
            if reader.dialect == "postgresql":
                assert reader._dbapi.autocommit is True
                assert reader._dbapi.info.transaction_status == 0  # idle: no BEGIN sent
            with reader.orm_session() as session:
                assert session.scalar(sa.text("SELECT 2")) == 2
        with engine.connect() as conn:  # the same pooled connection, handed out again
            if conn.dialect.name == "postgresql":
                assert conn.connection.driver_connection.autocommit is False  # type: ignore[union-attr]
            assert conn.exec_driver_sql("SELECT 3").scalar() == 3
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_pooled_reader_of_an_unreachable_database(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("needs a server address")
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        with (
            pytest.raises(DatabaseUnavailable, match="cannot be reached"),
            RawReader.pooled(engine),
        ):
            pass
    finally:
        engine.dispose()
