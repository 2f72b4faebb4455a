"""The real migrations: up from empty, down to base, up again; models == migrations."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine

from kronscope.db.base import Base, include_name
from kronscope.db.engine import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)

TABLES = {
    "sae",
    "harvest",
    "token",
    "context",
    "example",
    "unit_stats",
    "explanation",
    "explanation_revision",
    "job",
    "api_key",
}


def _diff(engine: Engine, metadata: sa.MetaData = Base.metadata) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"include_name": include_name, "compare_type": True}
        )
        return list(compare_metadata(ctx, metadata))


def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert set(sa.inspect(engine).get_table_names()) >= TABLES

        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}

        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert _diff(engine) == []
        upgrade(engine)  # idempotent
    finally:
        engine.dispose()


def test_upgrade_by_url(empty_db_url: str) -> None:
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()


def test_autogenerate_diff_is_empty(db_engine: Engine) -> None:
    assert _diff(db_engine) == []


def test_diff_sees_a_change(db_engine: Engine) -> None:
    """Guard against a comparison that would pass vacuously."""
    metadata = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    metadata.tables["job"].append_column(sa.Column("extra", sa.Integer))
    assert any("extra" in repr(d) for d in _diff(db_engine, metadata))


def test_full_text_objects_per_dialect(db_engine: Engine) -> None:
    inspector = sa.inspect(db_engine)
    if db_engine.dialect.name == "sqlite":
        with db_engine.connect() as conn:
            names = set(
                conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE name LIKE 'explanation_fts%'"
                ).scalars()
            )
        assert {
            "explanation_fts",
            "explanation_fts_ai",
            "explanation_fts_au",
            "explanation_fts_ad",
        } <= names
    else:
        columns = {c["name"] for c in inspector.get_columns("explanation")}
        assert "search_vector" in columns
        indexes = {i["name"] for i in inspector.get_indexes("explanation")}
        assert "ix_explanation_search_vector" in indexes
