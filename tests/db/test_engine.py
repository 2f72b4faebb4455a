"""Engine set-up per dialect and 'database unavailable' errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kronscope.db import DatabaseUnavailable, check_connection, make_engine, make_sessionmaker


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")  # parent folder created
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert (conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
    finally:
        engine.dispose()


def test_sqlite_savepoint_rolls_back_inside_transaction(tmp_path: Path) -> None:
    """SQLAlchemy, not sqlite3, emits BEGIN: SAVEPOINTs work as on any database."""
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        with engine.connect() as conn:
            outer = conn.begin()
            nested = conn.begin_nested()
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            nested.commit()
            outer.rollback()
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    finally:
        engine.dispose()


def test_begin_immediate_sessions(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        with make_sessionmaker(engine, begin_immediate=True)() as session:
            session.execute(sa.text("SELECT 1"))
        assert "BEGIN IMMEDIATE" in statements
    finally:
        engine.dispose()


def test_sqlite_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}")  # a folder, not a file
    with pytest.raises(DatabaseUnavailable):
        check_connection(engine)


def test_postgres_down_fails_fast() -> None:
    engine: Engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    start = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        check_connection(engine)
    assert time.monotonic() - start < 10
    assert info.value.status_code == 503


def test_unsupported_backend() -> None:
    with pytest.raises(ValueError):
        make_engine("mysql://x@localhost/db")


def test_check_connection(db_engine: Engine) -> None:
    check_connection(db_engine)
