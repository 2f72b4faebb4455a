"""Store a :class:`HarvestResult` through the repositories (bulk path: COPY on PostgreSQL).

Writes into the caller's session and transaction: the runner writes everything and flips
``sae.active_harvest_id`` (``harvests.mark_complete``) in one transaction, so a harvest is
visible completely or not at all, and a failure mid-write leaves nothing behind.

- Contexts: only those some example refers to, once each (``position`` = the context's
  global index in the harvest's context list), with their token ids; the display string of
  every token id they use is stored once per harvest.
- Examples: per-token values as float16 bytes. Top examples: rank 0 is the highest max.
  Samples: rank is the order of the sampling key, so the first r samples of a unit are
  themselves a uniform sample of size r; ``sample_pos``/``sample_value`` give the sampled
  token.
- Unit stats: one row per unit (dead units included). Histograms are trimmed to the span
  of non-empty bins, with the edges of that span (the full edges are in
  ``harvest.params["histogram_edges"]``): a few hundred bytes a unit instead of 1 KB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session
from torch import Tensor

from ..db.codec import pack_i32
from ..db.models import Example
from ..db.repositories import bulk_insert
from ..db.repositories import examples as examples_repo
from ..db.repositories import stats as stats_repo
from .result import ExampleSet, HarvestResult

TokenStrings = Callable[[Sequence[int]], list[str]]
EXAMPLE_COLUMNS = (
    "harvest_id",
    "unit_kind",
    "unit_index",
    "kind",
    "rank",
    "context_id",
    "max_value",
    "max_pos",
    "values",
    "sample_pos",
    "sample_value",
)


@dataclass
class WriteCounts:
    contexts: int = 0
    tokens: int = 0
    examples: int = 0
    stats: int = 0

    @property
    def rows(self) -> int:
        return self.contexts + self.tokens + self.examples + self.stats


def _example_rows(
    harvest_id: int, kind: int, s: ExampleSet, context_ids: dict[int, int]
) -> Iterator[dict[str, Any]]:
    """Rows of the ``example`` table, built from whole columns (``tolist`` converts once)."""
    values = np.ascontiguousarray(s.values.astype("<f2", copy=False))
    cols = zip(
        s.unit_kind.tolist(),
        s.unit_index.tolist(),
        s.rank.tolist(),
        [context_ids[c] for c in s.ctx.tolist()],
        s.max_value.astype(np.float64).tolist(),
        s.max_pos.tolist(),
        [None] * len(s) if s.sample_pos is None else s.sample_pos.tolist(),
        [None] * len(s) if s.sample_value is None else s.sample_value.astype(np.float64).tolist(),
        strict=True,
    )
    for i, (uk, ui, rank, cid, mv, mp, sp, sv) in enumerate(cols):
        yield {
            "harvest_id": harvest_id,
            "unit_kind": uk,
            "unit_index": ui,
            "kind": kind,
            "rank": rank,
            "context_id": cid,
            "max_value": mv,
            "max_pos": mp,
            "values": values[i].tobytes(),
            "sample_pos": sp,
            "sample_value": sv,
        }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def trim_histogram(
    counts: np.ndarray, edges: Sequence[float]
) -> tuple[np.ndarray, list[float]] | None:
    """The span of non-empty bins and its edges, or None when every bin is empty."""
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return None
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    return counts[lo:hi], [float(e) for e in edges[lo : hi + 1]]


def write_result(
    session: Session,
    harvest_id: int,
    result: HarvestResult,
    input_ids: Tensor,
    token_strings: TokenStrings,
) -> WriteCounts:
    """Write contexts, tokens, examples and unit stats of ``result`` under ``harvest_id``.

    ``input_ids`` [N, L]: the harvest's contexts (global index = row)."""
    counts = WriteCounts()
    ctx_index = result.context_indices()
    ids = input_ids[torch.from_numpy(ctx_index.astype(np.int64))].cpu().numpy()
    vocab = np.unique(ids).tolist() if ids.size else []
    counts.tokens = examples_repo.add_tokens(
        session, harvest_id, dict(zip(vocab, token_strings(vocab), strict=True))
    )
    context_ids = examples_repo.add_contexts(
        session,
        harvest_id,
        ((int(c), pack_i32(row)) for c, row in zip(ctx_index, ids, strict=True)),
    )
    counts.contexts = len(context_ids)
    for kind, s in result.examples:
        # The repositories' bulk path (COPY on PostgreSQL), fed whole rows: the same columns
        # ``examples.add_examples`` writes, without an object per row on the way.
        counts.examples += bulk_insert(
            session,
            Example,
            _example_rows(harvest_id, kind, s, context_ids),
            columns=EXAMPLE_COLUMNS,
        )

    edges = result.params.hist_edges()
    strings: dict[int, str] = {}

    def effects(pairs: list[tuple[int, float]]) -> list[list[Any]]:
        missing = [t for t, _ in pairs if t not in strings]
        if missing:
            strings.update(zip(missing, token_strings(missing), strict=True))
        return [[strings[t], v] for t, v in pairs]

    def stat_rows() -> Iterator[dict[str, Any]]:
        for u in result.units:
            for i in range(len(u.n_active)):
                trimmed = trim_histogram(u.hist[i], edges)
                row: dict[str, Any] = {
                    "unit_kind": int(u.unit_kind[i]),
                    "unit_index": int(u.unit_index[i]),
                    "n_active": int(u.n_active[i]),
                    "frequency": float(u.frequency[i]),
                    "mean_value": _finite(float(u.mean_value[i])),
                    "max_value": float(u.max_value[i]),
                    "histogram": None if trimmed is None else trimmed[0],
                    "histogram_edges": None if trimmed is None else trimmed[1],
                }
                if u.both_parents_active is not None:
                    row["both_parents_active"] = int(u.both_parents_active[i])
                if u.kept_count is not None:
                    row["kept_count"] = int(u.kept_count[i])
                if u.logit_top is not None and u.logit_bottom is not None:
                    row["logit_effects"] = {
                        "top": effects(u.logit_top[i]),
                        "bottom": effects(u.logit_bottom[i]),
                    }
                if u.neighbours is not None:
                    row["neighbours"] = [[j, c] for j, c in u.neighbours[i]]
                yield row

    counts.stats = stats_repo.add_stats(session, harvest_id, stat_rows())
    return counts
