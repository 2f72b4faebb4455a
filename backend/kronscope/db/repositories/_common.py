"""Small shared pieces of the repositories."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Generic, TypeVar

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
