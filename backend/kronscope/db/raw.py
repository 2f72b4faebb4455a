"""Reads on the driver's own connection, for the pages a dashboard serves most.

A feature page is a handful of small queries with fixed shapes. Through SQLAlchemy each
one pays for building a result object, processing every column of every row and (ORM)
identity-mapping the rows: several times the CPU of the same statement run on the
driver's cursor, which on a busy server is most of a page's cost (``benchmarks/
api_load.py`` measures the pages). The statements here are therefore plain SQL run on the
DBAPI connection underneath a SQLAlchemy ``Connection`` or ``Session``, inside its
transaction, with its pool, pre-ping and disconnect handling:

- ``RawQuery``: one statement written once with ``:name`` parameters and rendered per
  dialect (psycopg's ``%(name)s``, sqlite3's own ``:name``). A list parameter, written
  ``IN :name``, becomes ``= ANY(%(name)s::integer[])`` with an array on PostgreSQL and
  ``IN (SELECT value FROM json_each(:name))`` with a JSON list on SQLite: one statement
  text whatever the list's length, so each database's statement cache keeps it.
- ``RawReader``: runs them. A driver error that means "the database cannot be reached"
  invalidates the pooled connection and becomes ``DatabaseUnavailable`` (HTTP 503), as
  the engine's ``handle_error`` hook does for SQLAlchemy statements.
- ``utc`` and ``json_value``: the two column types whose raw values differ between the
  drivers (timestamps, JSON), turned into what SQLAlchemy's types would give.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.orm import Session

from .errors import DatabaseUnavailable

_LIST = re.compile(r"\bIN\s+:(\w+)")
_PARAM = re.compile(r"(?<![:\w]):(\w+)")


class RawQuery:
    """A statement in SQL with ``:name`` parameters (``IN :name`` for a list of integers)."""

    def __init__(self, sql: str) -> None:
        self.sql = " ".join(sql.split())
        self.lists = frozenset(_LIST.findall(self.sql))

    @cached_property
    def postgresql(self) -> str:
        sql = self.sql.replace("%", "%%")
        sql = _LIST.sub(r"= ANY(:\1::integer[])", sql)
        return _PARAM.sub(r"%(\1)s", sql)

    @cached_property
    def sqlite(self) -> str:
        return _LIST.sub(r"IN (SELECT value FROM json_each(:\1))", self.sql)

    def render(self, dialect: str) -> str:
        if dialect == "postgresql":
            return self.postgresql
        if dialect == "sqlite":
            return self.sqlite
        raise ValueError(f"unsupported database {dialect!r}")

    def __repr__(self) -> str:
        return f"RawQuery({self.sql!r})"


@functools.lru_cache(maxsize=64)
def _url_text(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def _is_unavailable(dialect: sa.Dialect, exc: BaseException, dbapi_conn: Any) -> bool:
    """The same test as ``engine._is_unavailable``, on a driver exception."""
    if dialect.is_disconnect(exc, dbapi_conn, None):  # type: ignore[arg-type]
        return True
    dbapi = dialect.loaded_dbapi
    if not isinstance(exc, dbapi.OperationalError):
        return False
    if dialect.name == "postgresql":
        return True  # psycopg's OperationalError is about the connection, not a statement
    return "unable to open database file" in str(exc).lower()


class RawReader:
    """Runs ``RawQuery`` statements on the DBAPI connection of ``connection`` (a SQLAlchemy
    ``Connection``), or of a connection checked out of an engine's pool (``pooled``)."""

    def __init__(self, connection: sa.Connection) -> None:
        fairy = connection.connection  # the pooled DBAPI connection (begins the transaction)
        self._setup(connection.engine, fairy.driver_connection, connection.invalidate)
        self._session: Session | None = None

    def _setup(self, engine: sa.Engine, driver: Any, invalidate: Any) -> None:
        assert driver is not None, "the connection is closed"
        self.engine = engine
        self.dialect = engine.dialect.name
        self.database = _url_text(engine.url)
        """Which database (for cache keys of data that never changes)."""
        self._dbapi: Any = driver
        self._invalidate = invalidate
        self._errors = engine.dialect.loaded_dbapi.Error

    @classmethod
    def of(cls, db: Session | sa.Connection) -> RawReader:
        """The reader of a session's (or connection's) current connection."""
        reader = cls(db.connection() if isinstance(db, Session) else db)
        if isinstance(db, Session):
            reader._session = db
        return reader

    @classmethod
    @contextlib.contextmanager
    def pooled(cls, engine: sa.Engine) -> Iterator[RawReader]:
        """A reader on a connection of ``engine``'s pool, outside any transaction (each
        statement sees what was committed when it started), given back at the end. For
        read-only pages: no ``Session`` or ``Connection`` to build, no ``BEGIN`` or
        ``ROLLBACK`` to send (together several times the CPU of a page's query)."""
        try:
            fairy = engine.raw_connection()
        except sa.exc.DBAPIError as exc:
            raise DatabaseUnavailable(
                f"the database at {_url_text(engine.url)} cannot be reached: {exc.orig}"
            ) from exc
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DatabaseUnavailable(
                f"the database at {_url_text(engine.url)} cannot be reached: {exc}"
            ) from exc
        driver: Any = fairy.driver_connection
        postgresql = engine.dialect.name == "postgresql"
        try:
            if postgresql:
                driver.autocommit = True  # no transaction around the reads
            reader = cls.__new__(cls)
            reader._setup(engine, driver, fairy.invalidate)
            reader._session = None
            yield reader
        finally:
            if postgresql and fairy.is_valid:
                with contextlib.suppress(Exception):  # a broken one is discarded on close
                    driver.autocommit = False  # as the pool's other users expect it
            fairy.close()

    @contextlib.contextmanager
    def orm_session(self) -> Iterator[Session]:
        """A SQLAlchemy session for the reads that need one: the reader's own session, or
        a new one on the same engine (closed at the end)."""
        if self._session is not None:
            yield self._session
            return
        with Session(self.engine) as session:
            yield session

    def _params(self, query: RawQuery, params: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.dialect != "sqlite" or not query.lists:
            return params
        return {k: json.dumps([int(x) for x in v]) if k in query.lists else v
                for k, v in params.items()}  # fmt: skip

    def all(self, query: RawQuery, **params: Any) -> list[tuple[Any, ...]]:
        """Every row, as tuples in the statement's column order."""
        return self.batch([(query, params)])[0]

    def batch(
        self, statements: Sequence[tuple[RawQuery, Mapping[str, Any]]]
    ) -> list[list[tuple[Any, ...]]]:
        """The rows of each statement. On PostgreSQL the statements go out together and
        their results come back together (psycopg's pipeline mode): one round trip to the
        server for the lot, which on a busy machine costs about as much CPU as one query
        (waking up, system calls) rather than one per statement."""
        if not statements:
            return []
        try:
            if self.dialect == "postgresql":
                return self._postgresql(statements)
            return [
                list(self._dbapi.execute(q.render("sqlite"), self._params(q, p)).fetchall())
                for q, p in statements
            ]
        except self._errors as exc:
            if _is_unavailable(self.engine.dialect, exc, self._dbapi):
                # This connection is gone, and so probably are the pool's others (a server
                # restart): replace the pool, as SQLAlchemy does on a disconnect.
                self._invalidate(exc)
                self.engine.dispose(close=False)
                err = DatabaseUnavailable(
                    f"the database cannot be reached: {str(exc).strip().splitlines()[0]}"
                )
                err.broken_connection = True  # type: ignore[attr-defined]
                raise err from exc
            raise

    def _postgresql(
        self, statements: Sequence[tuple[RawQuery, Mapping[str, Any]]]
    ) -> list[list[tuple[Any, ...]]]:
        db = self._dbapi
        # Integer lists go as array literals ('{1,2,3}', cast by the statement): psycopg's
        # own list adaptation inspects every element to choose a type.
        statements = [
            (q, {k: "{" + ",".join(str(int(x)) for x in v) + "}" if k in q.lists else v
                 for k, v in p.items()} if q.lists else p)
            for q, p in statements
        ]  # fmt: skip
        # Binary results: bytea arrives as bytes, with no hex text to decode.
        if len(statements) == 1:
            query, params = statements[0]
            return [list(db.execute(query.postgresql, params, binary=True).fetchall())]
        with db.pipeline():
            cursors = [db.execute(q.postgresql, p, binary=True) for q, p in statements]
        return [list(cursor.fetchall()) for cursor in cursors]

    def one(self, query: RawQuery, **params: Any) -> tuple[Any, ...] | None:
        """The first row, or None."""
        rows = self.all(query, **params)
        return rows[0] if rows else None


def utc(value: Any) -> datetime | None:
    """A timestamp column's raw value (an aware datetime from psycopg, text from SQLite) as
    an aware UTC datetime, like ``UTCDateTime`` gives."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def json_value(value: Any) -> Any:
    """A JSON column's raw value (decoded by psycopg, text on SQLite or when a statement
    casts it) as Python data."""
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:  # what orjson refuses and json reads (NaN)
            return json.loads(value)
    return value
