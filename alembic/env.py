"""Alembic environment for KronScope.

Where the database comes from, first match wins:
1. ``config.attributes["connection"]``: a Connection handed over by
   ``kronscope.db.engine.upgrade`` (tests, ``kronscope db upgrade``, app start);
2. ``alembic -x url=...`` on the command line;
3. ``sqlalchemy.url`` set on the Config;
4. KronScope's Settings (``KRONSCOPE_DATABASE_URL``, else the SQLite file in the data dir).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from kronscope.db import models  # noqa: F401  (registers the tables on Base.metadata)
from kronscope.db.base import Base, include_name

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    x_args = context.get_x_argument(as_dictionary=True)
    if x_args.get("url"):
        return x_args["url"]
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from kronscope.config import get_settings

    return get_settings().resolved_database_url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=include_name,
        compare_type=True,
        # SQLite cannot ALTER most things: later migrations rebuild tables in batch mode.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        include_name=include_name,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return

    # Same path as kronscope.db.engine.upgrade: one transaction, migration lock held.
    from kronscope.db.engine import migration_connection

    with migration_connection(_url()) as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
