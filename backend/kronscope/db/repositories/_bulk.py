"""Fast bulk inserts, one path per database, on the session's own connection and transaction.

- PostgreSQL: ``COPY ... FROM STDIN (FORMAT BINARY)`` through psycopg's ``cursor.copy()``:
  bytea goes over the wire as raw bytes (no hex escaping), no per-row statement.
- SQLite: ``executemany`` of one prepared INSERT, in chunks.

Rows are mappings from column name to value; every row must have the same keys. Columns
left out get the database default (NULL): Python-side ORM defaults are not applied, so use
this for the harvest's bulk tables (contexts, tokens, examples, stats), not for entities.
JSON columns are serialised here; ``None`` is SQL NULL. numpy scalars are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

SQLITE_CHUNK = 5_000

# Compiled PostgreSQL type name -> the type name psycopg's binary COPY should send.
_PG_COPY_TYPES = {
    "BIGINT": "int8",
    "INTEGER": "int4",
    "SMALLINT": "int2",
    "REAL": "float4",
    "DOUBLE PRECISION": "float8",
    "FLOAT": "float8",
    "BYTEA": "bytea",
    "TEXT": "text",
    "VARCHAR": "text",
    "JSON": "text",  # json's binary form is its text: send the serialised text
    "BOOLEAN": "bool",
    "TIMESTAMP WITH TIME ZONE": "timestamptz",
}


def _table(target: sa.Table | type[Any]) -> sa.Table:
    table = target if isinstance(target, sa.Table) else getattr(target, "__table__", None)
    if not isinstance(table, sa.Table):
        raise TypeError(f"a Table or a mapped class is expected, got {target!r}")
    return table


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


def _chunks(rows: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def bulk_insert(
    session: Session,
    target: sa.Table | type[Any],
    rows: Iterable[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
) -> int:
    """Insert ``rows`` into ``target`` with the database's fast path; returns the row count.

    ``columns`` defaults to the keys of the first row. Runs inside the session's current
    transaction (the session is flushed first so pending ORM rows go before).
    """
    table = _table(target)
    it = iter(rows)
    first = next(it, None)
    if first is None:
        return 0
    cols = list(columns) if columns is not None else list(first.keys())
    unknown = [c for c in cols if c not in table.c]
    if unknown:
        raise ValueError(f"{table.name} has no column(s) {', '.join(unknown)}")
    json_cols = {c for c in cols if isinstance(table.c[c].type, sa.JSON)}
    session.flush()
    conn = session.connection()

    def _rows() -> Iterator[Mapping[str, Any]]:
        yield first
        yield from it

    if conn.dialect.name == "postgresql":
        return _copy_postgres(conn, table, cols, json_cols, _rows())
    return _executemany(conn, table, cols, json_cols, _rows())


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _copy_postgres(
    conn: sa.Connection,
    table: sa.Table,
    cols: list[str],
    json_cols: set[str],
    rows: Iterable[Mapping[str, Any]],
) -> int:
    dialect = conn.dialect
    prep = dialect.identifier_preparer
    types = []
    for c in cols:
        compiled = table.c[c].type.compile(dialect=dialect).split("(")[0].strip().upper()
        if compiled not in _PG_COPY_TYPES:
            raise TypeError(f"no COPY type for {table.name}.{c} ({compiled})")
        types.append(_PG_COPY_TYPES[compiled])
    sql = (
        f"COPY {prep.format_table(table)} ({', '.join(prep.quote(c) for c in cols)}) "
        "FROM STDIN (FORMAT BINARY)"
    )
    json_idx = [i for i, c in enumerate(cols) if c in json_cols]
    count = 0
    dbapi_conn: Any = conn.connection.dbapi_connection
    with dbapi_conn.cursor() as cur, cur.copy(sql) as copy:
        copy.set_types(types)
        for row in rows:
            values = [_plain(row[c]) for c in cols]
            for i in json_idx:
                values[i] = _json_text(values[i])
            copy.write_row(values)
            count += 1
    return count


def _executemany(
    conn: sa.Connection,
    table: sa.Table,
    cols: list[str],
    json_cols: set[str],
    rows: Iterable[Mapping[str, Any]],
) -> int:
    # Serialise JSON here too, so both databases store byte-identical text.
    stmt = sa.insert(table).compile(dialect=conn.dialect, column_keys=cols)
    sql = str(stmt)
    names = stmt.positiontup or []
    order = [cols.index(n) for n in names] if names else list(range(len(cols)))
    count = 0
    for chunk in _chunks(rows, SQLITE_CHUNK):
        params = []
        for row in chunk:
            values = [_plain(row[c]) for c in cols]
            for i, c in enumerate(cols):
                if c in json_cols:
                    values[i] = _json_text(values[i])
            params.append(tuple(values[i] for i in order))
        conn.exec_driver_sql(sql, params)
        count += len(params)
    return count
