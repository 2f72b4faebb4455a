"""Small shared pieces of the repositories."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

T = TypeVar("T")

# Below SQLite's default limit on bound parameters (32766) and friendly to PostgreSQL plans.
IN_CHUNK = 1_000


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list and the size of the whole list (``{"items": [...], "total": N}``)."""

    items: list[T]
    total: int


def chunked(values: Iterable[T], size: int = IN_CHUNK) -> Iterator[list[T]]:
    it = iter(values)
    while chunk := list(islice(it, size)):
        yield chunk


def unique_ints(values: Iterable[int]) -> Sequence[int]:
    return sorted({int(v) for v in values})


def units_clause(
    kind_column: Any, index_column: Any, units: Sequence[tuple[int, int]]
) -> sa.ColumnElement[bool]:
    """``(kind, index) IN units`` as one ``kind = k AND index IN (...)`` per kind: both
    databases plan that as an index scan per kind, where a row-value IN list would be
    planned (slowly, on PostgreSQL) as one OR branch per unit."""
    by_kind: dict[int, list[int]] = {}
    for kind, index in units:
        by_kind.setdefault(int(kind), []).append(int(index))
    return sa.or_(
        *(sa.and_(kind_column == k, index_column.in_(v)) for k, v in sorted(by_kind.items()))
    )
