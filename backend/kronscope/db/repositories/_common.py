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
    kind_column: Any, index_column: Any, kinds: Sequence[int]
) -> sa.ColumnElement[bool]:
    """``(kind, index) IN units`` as one ``kind = k AND index IN :units_k`` per kind (the
    lists bound with ``units_params``): both databases plan that as an index scan per
    kind, where a row-value IN list would be planned (slowly, on PostgreSQL) as one OR
    branch per unit. Depends on the kinds only, so a statement using it can be built once
    per set of kinds and reused."""
    return sa.or_(
        *(
            sa.and_(kind_column == k, index_column.in_(sa.bindparam(f"units_{k}", expanding=True)))
            for k in kinds
        )
    )


def units_params(units: Iterable[tuple[int, int]]) -> tuple[tuple[int, ...], dict[str, list[int]]]:
    """The kinds of ``units`` (sorted) and the bound index lists ``units_clause`` reads."""
    by_kind: dict[int, list[int]] = {}
    for kind, index in units:
        by_kind.setdefault(int(kind), []).append(int(index))
    kinds = tuple(sorted(by_kind))
    return kinds, {f"units_{k}": by_kind[k] for k in kinds}
