"""Pieces of the feature pages (``services.features``) against plain references."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from kronscope.services import features


def _reference_intervals(
    samples: list[tuple[float | None, dict[str, Any]]],
    max_value: float,
    n: int,
    mode: str,
    per_interval: int,
) -> list[dict[str, Any]]:
    """The intervals as numpy arrays compute them (the page's first implementation)."""
    values = np.array([v or 0.0 for v, _ in samples], dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    top = max(features._f0(max_value), float(values.max()) if values.size else 0.0)
    if mode == "quantile" and values.size:
        edges = np.quantile(values, np.linspace(0.0, 1.0, n + 1))
        edges[0] = min(0.0, float(edges[0]))
    else:
        edges = np.linspace(0.0, top, n + 1)
    edges[-1] = max(float(edges[-1]), top)
    groups = []
    for k in range(n):
        lo, hi = float(edges[k]), float(edges[k + 1])
        mask = (values >= lo) & ((values <= hi) if k == n - 1 else (values < hi))
        chosen = [samples[i] for i in np.flatnonzero(mask)]
        chosen.sort(key=lambda s: -(s[0] or 0.0))
        groups.append(
            {"index": k, "low": round(lo, 6), "high": round(hi, 6),
             "examples": [d for _, d in chosen[:per_interval]]}
        )  # fmt: skip
    return groups


@pytest.mark.parametrize("mode", ["width", "quantile"])
def test_intervals_equal_the_numpy_reference(mode: str) -> None:
    rng = random.Random(11)
    for trial in range(400):
        size = rng.choice([1, 2, 5, 25])
        values: list[float | None] = []
        for _ in range(size):
            kind = rng.random()
            if kind < 0.1:
                values.append(None)
            elif kind < 0.3:
                values.append(rng.choice([0.0, 0.5, 1.0, 2.0]))  # on the edges
            else:
                values.append(rng.random() * 3)
        samples = [(v, {"n": i}) for i, v in enumerate(values)]
        top = rng.choice([0.0, 1.0, 2.0, 3.5, float("nan")])
        n = rng.choice([1, 2, 3, 5, 20])
        per = rng.choice([1, 2, 5])
        got = features._intervals(samples, top, n, mode, per)  # type: ignore[arg-type]
        assert got == _reference_intervals(samples, top, n, mode, per), trial


def test_no_intervals() -> None:
    assert features._intervals([(1.0, {})], 2.0, 0, "width", 5) == []


def test_values_of_every_float16() -> None:
    """The lookup table gives, for each of the 65,536 float16 values, what ``_clean``
    computes: NaN as 0, infinities clipped to the float16 range, four decimals."""
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    np.testing.assert_array_equal(features._clean_f16(every), features._clean(every))
    assert features._clean_f16(np.array([np.nan, np.inf, -np.inf, 0.123456], np.float16)).tolist() == [
        0.0, 65504.0, -65504.0, 0.1235
    ]  # fmt: skip
