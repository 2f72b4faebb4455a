"""Declarative base, column types and the schema filter shared by models and migrations.

- One ``MetaData`` naming convention, so every constraint and index has a stable name that
  Alembic can address on both SQLite and PostgreSQL.
- ``UTCDateTime``: timestamps are stored in UTC and always come back timezone-aware (SQLite
  has no timezone type and would otherwise return naive values).
- ``BigIntPK``: 64-bit ids on PostgreSQL; on SQLite the id must be ``INTEGER PRIMARY KEY`` to
  be the (already 64-bit) rowid and autoincrement.
- Relationships are declared ``lazy="raise"``: a page that forgets an eager load fails
  loudly instead of issuing one query per row.
- A few objects exist only in one dialect and are created by the migration, not the models
  (the FTS5 table on SQLite, the ``tsvector`` column and its GIN index on PostgreSQL);
  ``include_name`` hides them from autogenerate so the model/migration diff stays empty.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that stores UTC and returns aware datetimes everywhere."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # naive values are taken to be UTC already
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":  # stored as text; keep one lexically sortable format
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# 64-bit on PostgreSQL; SQLite's INTEGER PRIMARY KEY is already the 64-bit rowid.
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# JSON that stores Python ``None`` as SQL NULL (not the JSON literal ``null``).
NullableJSON = sa.JSON(none_as_null=True)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False
    )


# Objects the migration creates per dialect and the models deliberately do not declare.
DIALECT_ONLY_TABLES = frozenset(
    {
        "explanation_fts",  # SQLite FTS5 virtual table and its shadow tables
        "explanation_fts_data",
        "explanation_fts_idx",
        "explanation_fts_content",
        "explanation_fts_docsize",
        "explanation_fts_config",
    }
)
DIALECT_ONLY_COLUMNS = frozenset({("explanation", "search_vector")})  # PostgreSQL tsvector
DIALECT_ONLY_INDEXES = frozenset({"ix_explanation_search_vector"})  # its GIN index


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic ``include_name`` hook: leave the dialect-only full-text objects out of diffs."""
    if type_ == "table":
        return name not in DIALECT_ONLY_TABLES
    if type_ == "column":
        return (parent_names.get("table_name"), name) not in DIALECT_ONLY_COLUMNS
    if type_ == "index":
        return name not in DIALECT_ONLY_INDEXES
    return True
