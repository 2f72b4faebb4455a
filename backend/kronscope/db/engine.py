"""Engines, sessions and migrations.

- SQLite: WAL (readers never block the writer), ``foreign_keys=ON`` (cascades), a busy
  timeout, and SQLAlchemy (not the ``sqlite3`` module) emitting ``BEGIN``: the module's
  legacy transaction handling breaks SAVEPOINTs and transactional DDL. A session made with
  ``begin_immediate=True`` starts with ``BEGIN IMMEDIATE`` (takes the write lock up front:
  use it for sessions that read then write, such as workers).
- PostgreSQL: a connection that sat idle in the pool for a while (``PING_IDLE_S``) is
  pinged before it is handed out, so one the server dropped (a restart, an idle timeout)
  is replaced instead of failing a request; and a short connect timeout, so a down server
  fails fast. A connection in steady use is not pinged: SQLAlchemy's ``pool_pre_ping``
  pings at every checkout, a round trip that cost a busy page server more CPU than any
  query of a feature page. A connection that breaks while in use fails its request with a
  503 and has the pool refreshed (``handle_error`` below, and ``db.raw``).
- Connection failures surface as ``DatabaseUnavailable`` (HTTP 503), not a raw driver error.
- ``upgrade`` runs the real Alembic migrations (tests, ``kronscope db upgrade``, app start);
  on PostgreSQL it holds an advisory lock so several processes starting at once migrate once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.orm import Session, sessionmaker

from .errors import DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 5
_BEGIN_OPTION = "kronscope_sqlite_begin"
# Any constant works; it only has to be the same in every process of the deployment.
_MIGRATION_LOCK_KEY = 0x4B524F4E  # "KRON"

ALEMBIC_DIR = Path(__file__).resolve().parents[3] / "alembic"
ALEMBIC_INI = ALEMBIC_DIR.parent / "alembic.ini"


def _is_unavailable(ctx: ExceptionContext) -> bool:
    """Is this error 'cannot reach the database' (as opposed to a bad statement or a lock)?"""
    if ctx.is_disconnect:
        return True
    if not isinstance(ctx.sqlalchemy_exception, sa.exc.OperationalError):
        return False
    if ctx.connection is None:  # raised while connecting: refused, timed out, no such file
        return True
    return "unable to open database file" in str(ctx.original_exception).lower()


def make_engine(url: str | URL, *, pool_size: int | None = None, **kwargs: Any) -> Engine:
    """An engine configured for SQLite or PostgreSQL (see the module docstring).
    ``pool_size``: connections kept open, and as many again allowed beyond them (databases
    on disk; an in-memory SQLite database has its own pool)."""
    url = make_url(url)
    backend = url.get_backend_name()
    database = url.database or ""
    in_memory = backend == "sqlite" and (not database or database == ":memory:"
                                         or "mode=memory" in str(url))  # fmt: skip
    if pool_size is not None and not in_memory:
        kwargs.setdefault("pool_size", pool_size)
        kwargs.setdefault("max_overflow", pool_size)
    if backend == "sqlite":
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (see below)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys = ON")
            if database and database != ":memory:":
                cur.execute("PRAGMA journal_mode = WAL")
                cur.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get(_BEGIN_OPTION, "")
            conn.exec_driver_sql(f"BEGIN {mode}".strip())

    elif backend == "postgresql":
        connect_args = {
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
            "application_name": "kronscope",
            **kwargs.pop("connect_args", {}),
        }
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        if not kwargs.get("pool_pre_ping"):
            _ping_when_idle(engine)
    else:
        raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")

    @event.listens_for(engine, "handle_error")
    def _unavailable(ctx: ExceptionContext) -> BaseException | None:
        if _is_unavailable(ctx):
            where = url.render_as_string(hide_password=True)
            err = DatabaseUnavailable(
                f"the database at {where} cannot be reached: {ctx.original_exception}"
            )
            err.__cause__ = ctx.original_exception
            return err
        return None

    return engine


PING_IDLE_S = 2.0
"""A pooled PostgreSQL connection idle at least this long is pinged before use."""
_IDLE_SINCE = "kronscope_idle_since"


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        if since is None or time.monotonic() - since < PING_IDLE_S:
            return
        try:
            dbapi_conn.execute("SELECT 1")
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()  # hand it out with no transaction open
        except Exception as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise sa.exc.DisconnectionError(f"a pooled connection is dead: {exc}") from exc


def make_sessionmaker(engine: Engine, *, begin_immediate: bool = False) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (``expire_on_commit=False``).

    ``begin_immediate`` (SQLite only; ignored elsewhere) takes the write lock when the
    transaction starts, so a transaction that reads and then writes cannot fail on a
    writer that committed in between.
    """
    bind: Engine = engine
    if begin_immediate and engine.dialect.name == "sqlite":
        bind = engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
    return sessionmaker(bind=bind, expire_on_commit=False)


def check_connection(engine: Engine) -> None:
    """Raise ``DatabaseUnavailable`` unless a trivial query succeeds (health checks)."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


# -- migrations ---------------------------------------------------------------------------


def alembic_config(url: str | None = None) -> Any:
    """The Alembic ``Config`` of this project (independent of the working directory)."""
    from alembic.config import Config

    if not ALEMBIC_DIR.is_dir():
        raise RuntimeError(f"the migrations folder {ALEMBIC_DIR} is missing")
    cfg = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.is_file() else Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def migration_connection(engine_or_url: Engine | str | URL) -> Iterator[Connection]:
    """A connection in a transaction holding the migration lock (committed on success)."""
    engine = engine_or_url if isinstance(engine_or_url, Engine) else make_engine(engine_or_url)
    try:
        # IMMEDIATE on SQLite: two processes migrating at once take turns instead of failing.
        with (
            engine.connect().execution_options(**{_BEGIN_OPTION: "IMMEDIATE"}) as conn,
            conn.begin(),
        ):
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
            yield conn
    finally:
        if engine is not engine_or_url:
            engine.dispose()


def upgrade(engine_or_url: Engine | str | URL, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with the real migrations, in one transaction."""
    from alembic import command

    cfg = alembic_config()
    with migration_connection(engine_or_url) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine_or_url: Engine | str | URL, revision: str) -> None:
    """Step the schema back to ``revision`` (``base`` drops everything)."""
    from alembic import command

    cfg = alembic_config()
    with migration_connection(engine_or_url) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(engine_or_url: Engine | str | URL) -> str | None:
    """The revision the database is at (``None``: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = engine_or_url if isinstance(engine_or_url, Engine) else make_engine(engine_or_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if engine is not engine_or_url:
            engine.dispose()


def head_revision() -> str | None:
    """The newest revision the code knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def pool_capacity(engine: Engine) -> int:
    """How many connections ``engine`` can hand out at once (pool size plus overflow); a
    large number for pools without a limit."""
    pool = engine.pool
    if isinstance(pool, sa.pool.QueuePool):
        overflow = pool._max_overflow  # no public accessor
        return 1_000 if overflow < 0 else pool.size() + overflow
    return 1_000
