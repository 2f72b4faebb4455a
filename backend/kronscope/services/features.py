"""Feature pages: latent lists, one latent (with its mAND composition), KronSAE parents and
head grids. Nothing here loads a model: everything is read from the SAE's active harvest
and its explanations.

Every function returns plain dicts in the shape of the API's response models (an
example's values as a float64 array, which ``api.deps.dumps`` writes as a list). Floats
that are not finite (a float16 overflow, an empty mean) become ``None`` or 0 so the JSON
is always valid. Each page costs one statement, whatever F is:

- a latent (or parent) page: the SAE's row, the unit's full statistics and its examples
  with their contexts, together (``pages.unit_page_statement``);
- a latent list or head grid: the SAE's row.

The SAE's row checks that the one remembered from an earlier page (which the reads were
planned from) is still current (if not, the page is planned again), and carries the SAE's
largest explanation change number. Explanations come from ``explanation_reads``, brought up
to that number first (one more query, only after explanations changed); an SAE with too
many explanations to cache has its units' explanations read in the same round trip.

Everything else comes from what ``harvest_reads`` caches of a finished harvest (every
unit's summary, the token strings), and the statements run on the driver's connection
(``db.raw``): on a busy server, building SQLAlchemy rows and pydantic models cost more
than the database did.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import numpy as np
from sqlalchemy.orm import Session

from ..db.models import Harvest, Sae, UnitKind
from ..db.raw import RawReader
from ..db.repositories import pages as pages_repo
from ..db.repositories import stats as stats_repo
from ..db.repositories.pages import ExplanationRow, SaeRef, Statement, UnitRow
from . import explanation_reads, harvest_reads
from .errors import NotFound, Unprocessable
from .harvest_reads import HarvestKey, KindSummary, SortKey, UnitSummaries
from .sae_registry import harvest_summary

SORTS: dict[str, SortKey] = {
    "index": "index",
    "density": "frequency",
    "max_activation": "max_value",
}
IntervalMode = Literal["width", "quantile"]
ParentKind = Literal["base", "extension"]
_PARENT_KIND = {"base": UnitKind.BASE, "extension": UnitKind.EXTENSION}
F16_MAX = 65504.0


# -- small converters ------------------------------------------------------------------------
def _f(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _f0(x: Any) -> float:
    v = _f(x)
    return 0.0 if v is None else v


def _count(x: Any) -> int | None:
    """A nullable count (NaN in the summaries' columns) as int or None."""
    if x is None:
        return None
    x = float(x)
    return int(x) if math.isfinite(x) else None


def _row_stats(s: UnitRow | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "n_active": int(s.n_active),
        "density": _f0(s.frequency),
        "mean_activation": _f(s.mean_value),
        "max_activation": _f0(s.max_value),
        "both_parents_active": _count(s.both_parents_active),
        "kept_count": _count(s.kept_count),
    }


def _record_stats(record: list[float] | None) -> dict[str, Any] | None:
    """A unit's statistics from its ``KindSummary.records`` entry."""
    if record is None:
        return None
    n_active, frequency, mean, top, both, kept = record
    return {
        "n_active": int(n_active),
        "density": _f0(frequency),
        "mean_activation": _f(mean),
        "max_activation": _f0(top),
        "both_parents_active": _count(both),
        "kept_count": _count(kept),
    }


def histogram_dict(s: UnitRow | None) -> dict[str, Any] | None:
    if s is None or s.histogram is None or not s.histogram_edges:
        return None
    from ..db.codec import unpack_i64

    counts = unpack_i64(s.histogram).tolist()
    edges = [_f0(e) for e in s.histogram_edges]
    if len(edges) != len(counts) + 1:
        return None
    return {"edges": edges, "counts": counts}


def explanation_dict(e: ExplanationRow) -> dict[str, Any]:
    return {
        "id": e.id,
        "text": e.text,
        "source": e.source,
        "author": e.author,
        "score": _f(e.score),
        "created_at": e.created_at,
        "updated_at": e.updated_at,
    }


def harvest_dict(h: Harvest, active_id: int | None) -> dict[str, Any]:
    return {
        "id": h.id,
        "status": h.status,
        "corpus": h.corpus_name,
        "corpus_description": h.corpus_description,
        "n_tokens": h.n_tokens,
        "tokens_seen": h.tokens_seen,
        "ctx_len": h.ctx_len,
        "params": h.params or {},
        "error": h.error,
        "created_at": h.created_at,
        "started_at": h.started_at,
        "finished_at": h.finished_at,
        "active": h.id == active_id,
    }


def sae_dict(session: Session, sae: Sae) -> dict[str, Any]:
    status, active, _ = harvest_summary(session, sae)
    prov = sae.provenance or {}
    return {
        "slug": sae.slug,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "h": sae.h,
        "m": sae.m,
        "n": sae.n,
        "composition": sae.composition,
        "dtype": sae.dtype,
        "model": sae.model_name,
        "hook": sae.hook_name,
        "metrics": sae.metrics or {},
        "source_format": prov.get("source_format"),
        "uploaded_by": prov.get("uploaded_by"),
        "file_hash": sae.file_hash,
        "created_at": sae.created_at,
        "harvest_status": status,
        "active_harvest": harvest_dict(active, sae.active_harvest_id) if active else None,
    }


# -- coordinates -------------------------------------------------------------------------------
def coordinates(sae: SaeLike, index: int) -> tuple[int, int, int] | None:
    if not sae.is_kronsae:
        return None
    assert sae.m and sae.n
    g, rest = divmod(index, sae.m * sae.n)
    i, j = divmod(rest, sae.n)
    return g, i, j


def check_index(sae: SaeLike, index: int) -> None:
    if not 0 <= index < sae.d_sae:
        raise NotFound(
            f"Latent {index} is out of range: {sae.slug} has latents 0 to {sae.d_sae - 1}.",
            detail={"index": index, "d_sae": sae.d_sae},
        )


# -- the SAE and its harvest -------------------------------------------------------------------
@dataclass(frozen=True)
class _Fresh:
    """An SAE's row and its largest explanation change number, just read together."""

    sae: SaeRef
    seq: int

    def __getattr__(self, name: str) -> Any:  # reads like the SaeRef it carries
        return getattr(self.sae, name)


SaeLike = Sae | SaeRef | _Fresh


class _Stale(Exception):
    """The SAE's row changed after a page planned its reads from it."""

    def __init__(self, fresh: _Fresh | None) -> None:
        self.fresh = fresh


def _no_sae(slug: str) -> NotFound:
    return NotFound(f"There is no SAE named {slug!r}.", detail={"sae": slug})


Explanations = dict[tuple[int, int], list[ExplanationRow]]


@dataclass
class _Reads:
    """One page's reads: the SAE (as remembered, checked by ``fetch``), its active
    harvest's cached data, its explanations (cached: ``explanation_reads``) and the page's
    statements."""

    reader: RawReader
    sae: SaeRef
    checked: bool
    seq: int = 0
    """The SAE's largest explanation change number, once its row has been read."""

    @classmethod
    def open(cls, db: Session | RawReader, sae: SaeLike | str) -> _Reads:
        reader = db if isinstance(db, RawReader) else RawReader.of(db)
        if isinstance(sae, _Fresh):  # just read from the database
            return cls(reader, sae.sae, True, sae.seq)
        slug = sae if isinstance(sae, str) else sae.slug
        ref = harvest_reads.remembered_sae(reader, slug)
        if ref is not None:
            return cls(reader, ref, False)
        ref, seq = pages_repo.sae_and_seq_by_slug(reader, slug)
        if ref is None:
            raise _no_sae(slug)
        harvest_reads.remember_sae(reader, slug, ref)
        return cls(reader, ref, True, seq)

    @property
    def key(self) -> HarvestKey | None:
        return harvest_reads.harvest_key(self.reader, self.sae)

    @property
    def harvest_id(self) -> int | None:
        return self.sae.active_harvest_id

    def summaries(self) -> UnitSummaries | None:
        key = self.key
        return None if key is None else harvest_reads.summaries(self.reader, key)

    def part(self, unit_kind: int) -> KindSummary | None:
        found = self.summaries()
        return None if found is None else found.kind(unit_kind)

    def fetch(self, statements: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        """Run the page's statements. Unless the SAE's row was just read, the same round
        trip reads it again: if it changed (a new harvest, a delete), ``_Stale`` says so
        and the page is planned again from the new row."""
        if self.checked:
            return self.reader.batch(statements)
        rows = self.reader.batch([pages_repo.sae_by_slug_statement(self.sae.slug), *statements])
        self._check(rows[0])
        return rows[1:]

    def _check(self, sae_rows: list[tuple[Any, ...]]) -> None:
        """``_Stale`` unless the SAE's row as just read is the one the page was planned
        from; note its explanation change number."""
        fresh = pages_repo.sae_from_rows(sae_rows)
        seq = pages_repo.explanation_seq_from_rows(sae_rows)
        if fresh != self.sae:
            harvest_reads.remember_sae(self.reader, self.sae.slug, fresh)
            raise _Stale(None if fresh is None else _Fresh(fresh, seq))
        self.checked = True
        self.seq = seq

    def fetch_unit(
        self, unit: _UnitPage, units: Sequence[tuple[int, int]]
    ) -> tuple[UnitRow | None, list[tuple[Any, ...]], Explanations]:
        """A unit's statistics and examples (with the SAE's row, checked, in the same
        statement) and the explanations of ``units``."""
        entry = explanation_reads.cached(self.reader, self.sae)
        statements = [unit.statement(self)]
        if entry is None:
            statements.append(pages_repo.explanations_statement(self.sae.id, units))
        rows = self.reader.batch(statements)
        sae_rows, stats, examples = pages_repo.unit_page_from_rows(rows[0])
        self._check(sae_rows)
        if entry is None:
            expl = pages_repo.explanations_from_rows(rows[1])
        else:
            expl = explanation_reads.explanations(self.reader, entry, self.sae, self.seq, units)
        return stats, examples, expl

    def fetch_explained(
        self, statements: Sequence[Statement], units: Iterable[tuple[int, int]]
    ) -> tuple[list[list[tuple[Any, ...]]], Explanations]:
        """``fetch(statements)`` and the explanations of ``units``: from the cache, brought
        up to the change number the SAE's row was read with, or (an SAE with too many to
        cache) read in the same round trip."""
        entry = explanation_reads.cached(self.reader, self.sae)
        if entry is None:
            query = pages_repo.explanations_statement(self.sae.id, units)
            rows = self.fetch([*statements, query])
            return rows[:-1], pages_repo.explanations_from_rows(rows[-1])
        rows = self.fetch(statements)
        return rows, explanation_reads.explanations(self.reader, entry, self.sae, self.seq, units)

    def explanations(self, units: Iterable[tuple[int, int]]) -> Explanations:
        return self.fetch_explained([], units)[1]


P = ParamSpec("P")
R = TypeVar("R")


def _current_sae(
    page: Callable[Concatenate[Any, SaeLike | str, P], R],
) -> Callable[Concatenate[Any, SaeLike | str, P], R]:
    """Plan the page again, once, if the SAE's row changed under it (or 404 if it is gone)."""

    @functools.wraps(page)
    def run(session: Any, sae: SaeLike | str, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return page(session, sae, *args, **kwargs)
        except _Stale as stale:
            if stale.fresh is None:
                raise _no_sae(sae if isinstance(sae, str) else sae.slug) from None
            return page(session, stale.fresh, *args, **kwargs)

    return run


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _briefs(
    sae: SaeRef, part: KindSummary | None, indices: Sequence[int], best: dict[int, str]
) -> list[dict[str, Any]]:
    """Latent summaries of ``indices`` (read from the cached columns in one gather)."""
    records = part.records(indices) if part is not None else [None] * len(indices)
    mn, n = (sae.m * sae.n, sae.n) if sae.m and sae.n and sae.is_kronsae else (0, 1)
    out = []
    for i, rec in zip(indices, records, strict=True):
        out.append(
            {
                "index": i,
                "head": i // mn if mn else None,
                "base": i % mn // n if mn else None,
                "extension": i % n if mn else None,
                "density": _finite(rec[1]) if rec else None,
                "max_activation": _finite(rec[3]) if rec else None,
                "mean_activation": _finite(rec[2]) if rec else None,
                "n_active": int(rec[0]) if rec else None,
                "explanation": best.get(i),
            }
        )
    return out


def _best_texts(
    explanations: dict[tuple[int, int], list[ExplanationRow]], unit_kind: int
) -> dict[int, str]:
    return {i: items[0].text for (k, i), items in explanations.items() if k == unit_kind and items}


@_current_sae
def briefs(
    session: Session | RawReader, sae: SaeLike | str, indices: Sequence[int]
) -> list[dict[str, Any]]:
    """Latent summaries for a set of indices (stats and best explanation), in that order."""
    reads = _Reads.open(session, sae)
    indices = [int(i) for i in indices]
    latent = int(UnitKind.LATENT)
    best = _best_texts(reads.explanations((latent, i) for i in indices), latent)
    return _briefs(reads.sae, reads.part(latent), indices, best)


# -- latent list -------------------------------------------------------------------------------
@_current_sae
def list_latents(
    session: Session | RawReader,
    sae: SaeLike | str,
    *,
    sort: str = "index",
    order: str | None = None,
    min_density: float | None = None,
    max_density: float | None = None,
    head: int | None = None,
    has_explanation: bool | None = None,
    q: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> dict[str, Any]:
    reads = _Reads.open(session, sae)
    ref = reads.sae
    if head is not None:
        if not ref.is_kronsae:
            raise Unprocessable(f"{ref.slug} is not a KronSAE, so it has no heads to filter by.")
        assert ref.h
        if not 0 <= head < ref.h:
            raise NotFound(f"Head {head} is out of range: {ref.slug} has heads 0 to {ref.h - 1}.")
    descending = (order or ("asc" if sort == "index" else "desc")) == "desc"
    part = reads.part(UnitKind.LATENT)
    if part is None:
        reads.fetch([])  # the SAE may have been harvested since it was remembered
        return {"items": [], "total": 0, "limit": limit, "offset": offset,
                "harvest_status": ref.harvest_status}  # fmt: skip
    if has_explanation is not None or (q is not None and q.strip()):
        # Filters on explanations (which change) go to the database's indexes.
        reads.fetch([])
        with reads.reader.orm_session() as orm:
            orm_sae = orm.get(Sae, ref.id)
            if orm_sae is None:
                raise _no_sae(ref.slug)
            page = stats_repo.list_units(
                orm,
                orm_sae,
                sort=SORTS[sort],
                descending=descending,
                min_frequency=min_density,
                max_frequency=max_density,
                head=head,
                has_explanation=has_explanation,
                q=q,
                limit=limit,
                offset=offset,
            )
        indices = [int(s.unit_index) for s in page.items]
        total = page.total
    else:
        index_range = None
        if head is not None:
            assert ref.m and ref.n
            size = ref.m * ref.n
            index_range = range(head * size, (head + 1) * size)
        rows = part.select(
            SORTS[sort],
            descending,
            min_frequency=min_density,
            max_frequency=max_density,
            index_range=index_range,
        )
        total = len(rows)
        indices = part.index[rows[offset : offset + limit]].tolist()
    latent = int(UnitKind.LATENT)
    best = _best_texts(reads.explanations((latent, i) for i in indices), latent)
    return {
        "items": _briefs(ref, part, indices, best),
        "total": total,
        "limit": limit,
        "offset": offset,
        "harvest_status": ref.harvest_status,
    }


# -- examples ------------------------------------------------------------------------------------
def _example_dicts(
    reads: _Reads, rows: Sequence[tuple[Any, ...]]
) -> list[tuple[float | None, dict[str, Any]]]:
    """``pages.unit_page_from_rows`` example rows -> (sampled value, example dict), values decoded
    and rounded for the whole set at once. An example's ``values`` are a float64 array
    (``dumps`` writes it as a list, as fast as a list of floats and without making one);
    its ``tokens`` are the context's cached, read-only token strings."""
    key = reads.key
    if not rows or key is None:
        return []
    vocab = harvest_reads.vocabulary(reads.reader, key)
    blobs = [bytes(r[6]) for r in rows]
    if len({len(b) for b in blobs}) == 1:
        matrix = np.frombuffer(b"".join(blobs), dtype="<f2").reshape(len(blobs), -1)
        values: Sequence[np.ndarray] = list(_clean_f16(matrix))
    else:
        values = [_clean_f16(np.frombuffer(b, dtype="<f2")) for b in blobs]
    out = []
    context_tokens = harvest_reads.context_tokens
    for r, v in zip(rows, values, strict=True):
        sample_value = _f(r[5])
        out.append(
            (
                sample_value,
                {
                    "rank": r[1],
                    "context_id": r[7],
                    "position": r[8],
                    "tokens": context_tokens(key, r[7], r[9], vocab),
                    "values": v,
                    "max_value": _f0(r[2]),
                    "max_pos": r[3],
                    "sample_pos": r[4],
                    "sample_value": sample_value,
                },
            )
        )
    return out


def _clean(values: np.ndarray) -> np.ndarray:
    """float16 values as float64 for JSON: non-finite ones clipped or zeroed, 4 decimals."""
    out = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=F16_MAX, neginf=-F16_MAX)
    return np.round(out, 4)


_F16_CLEAN = _clean(np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16))
"""``_clean`` of every float16 (by its bits): a page's values are one gather."""


def _clean_f16(values: np.ndarray) -> np.ndarray:
    return _F16_CLEAN[values.view(np.uint16)]


def _finite0(x: float | None) -> float:
    """A sampled value for interval arithmetic: NaN, infinities and None count as 0."""
    return x if x is not None and math.isfinite(x) else 0.0


def _intervals(
    samples: list[tuple[float | None, dict[str, Any]]],
    max_value: float,
    n: int,
    mode: IntervalMode,
    per_interval: int,
) -> list[dict[str, Any]]:
    """The sampled examples in ``n`` activation intervals from 0 to the maximum: equal
    width (``np.linspace``'s edges, computed as it does) or equal count (quantiles); each
    interval's highest samples first. A few dozen samples: plain Python beats numpy."""
    if n <= 0:
        return []
    values = [_finite0(v) for v, _ in samples]
    top = max(_f0(max_value), max(values) if values else 0.0)
    if mode == "quantile" and values:
        edges = np.quantile(np.array(values, dtype=np.float64), np.linspace(0.0, 1.0, n + 1))
        edges[0] = min(0.0, float(edges[0]))
        bounds = edges.tolist()
    else:
        step = top / n
        bounds = [k * step for k in range(n)] + [top]
    bounds[-1] = max(bounds[-1], top)
    groups: list[dict[str, Any]] = []
    for k in range(n):
        lo, hi = bounds[k], bounds[k + 1]
        last = k == n - 1
        chosen = [
            (v, d) for v, (_, d) in zip(values, samples, strict=True)
            if v >= lo and (v <= hi if last else v < hi)
        ]  # fmt: skip
        chosen.sort(key=lambda s: -s[0])
        groups.append(
            {
                "index": k,
                "low": round(lo, 6),
                "high": round(hi, 6),
                "examples": [d for _, d in chosen[:per_interval]],
            }
        )
    return groups


@dataclass
class _UnitPage:
    """What a latent or parent page reads of its own unit, planned as statements."""

    kind: int
    index: int
    top_k: int
    intervals: int

    def statement(self, reads: _Reads) -> Statement:
        """The SAE's row, the unit's statistics and examples, in one statement."""
        kinds = ([0] if self.top_k != 0 else []) + ([1] if self.intervals > 0 else [])
        return pages_repo.unit_page_statement(
            reads.sae.slug, reads.harvest_id, self.kind, self.index, kinds
        )

    def build(
        self,
        reads: _Reads,
        stats: UnitRow | None,
        examples: list[tuple[Any, ...]],
        explanations: list[ExplanationRow],
        mode: IntervalMode,
        per_interval: int,
    ) -> dict[str, Any]:
        top: list[dict[str, Any]] = []
        samples: list[tuple[float | None, dict[str, Any]]] = []
        if examples:
            top_rows = [r for r in examples if r[0] == 0][: self.top_k]
            sample_rows = [r for r in examples if r[0] == 1]
            decoded = _example_dicts(reads, top_rows + sample_rows)
            top = [d for _, d in decoded[: len(top_rows)]]
            samples = decoded[len(top_rows) :]
        page = {
            "harvest_status": reads.sae.harvest_status,
            "harvest_id": reads.harvest_id,
            "stats": _row_stats(stats),
            "histogram": histogram_dict(stats),
            "explanations": [explanation_dict(e) for e in explanations],
            "top_examples": top,
            "sampled_examples": (
                _intervals(
                    samples, stats.max_value if stats else 0.0, self.intervals, mode, per_interval
                )
                if samples
                else []
            ),
            "interval_mode": mode,
        }
        return page


# -- one latent ----------------------------------------------------------------------------------
def _parent_key(sae: SaeLike, kind: ParentKind, head: int, within: int) -> tuple[int, int]:
    assert sae.m and sae.n
    size = sae.m if kind == "base" else sae.n
    return int(_PARENT_KIND[kind]), head * size + within


def _parent_brief(
    reads: _Reads,
    kind: ParentKind,
    head: int,
    within: int,
    key: tuple[int, int],
    explanations: dict[tuple[int, int], list[ExplanationRow]],
) -> dict[str, Any]:
    part = reads.part(key[0])
    return {
        "kind": kind,
        "head": head,
        "index": within,
        "flat_index": key[1],
        "stats": _record_stats(part.records([key[1]])[0] if part is not None else None),
        "explanations": [explanation_dict(e) for e in explanations.get(key, [])],
    }


def _siblings(sae: SaeLike, index: int) -> tuple[list[int], list[int]]:
    coords = coordinates(sae, index)
    if coords is None:
        return [], []
    g, i, j = coords
    assert sae.m and sae.n
    first = g * sae.m * sae.n
    row = [first + i * sae.n + jj for jj in range(sae.n) if jj != j]
    col = [first + ii * sae.n + j for ii in range(sae.m) if ii != i]
    return row, col


def _neighbour_pairs(sae: SaeLike, s: UnitRow | None) -> list[tuple[int, float]]:
    if s is None or not s.neighbours:
        return []
    out = []
    for p in s.neighbours:
        if isinstance(p, list | tuple) and len(p) == 2:
            try:
                i, c = int(p[0]), _f0(p[1])
            except (TypeError, ValueError):
                continue
            if 0 <= i < sae.d_sae:
                out.append((i, c))
    return out


def _logit_effects(s: UnitRow | None) -> dict[str, Any] | None:
    if s is None or not isinstance(s.logit_effects, dict):
        return None

    def pairs(items: Any) -> list[dict[str, Any]]:
        out = []
        for item in items or []:
            if isinstance(item, list | tuple) and len(item) == 2 and _f(item[1]) is not None:
                out.append({"token": str(item[0]), "value": _f0(item[1])})
        return out

    return {
        "top": pairs(s.logit_effects.get("top")),
        "bottom": pairs(s.logit_effects.get("bottom")),
    }


@_current_sae
def latent_detail(
    session: Session | RawReader,
    sae: SaeLike | str,
    index: int,
    *,
    top_k: int = 20,
    intervals: int = 5,
    mode: IntervalMode = "width",
    per_interval: int = 5,
) -> dict[str, Any]:
    """One latent's page: its statistics, histogram, examples, logit effects, neighbours and
    (KronSAE) its composition: both parents and its row and column siblings, each with
    their explanations and densities. Every unit shown is known before the reads (the
    neighbours from the cached summaries), so they go to the database in one round trip."""
    reads = _Reads.open(session, sae)
    ref = reads.sae
    check_index(ref, index)
    latent = int(UnitKind.LATENT)
    summaries = reads.summaries()
    row, col = _siblings(ref, index)
    coords = coordinates(ref, index)
    parents: dict[ParentKind, tuple[int, int]] = {}
    if coords is not None:
        g, i, j = coords
        parents = {
            "base": _parent_key(ref, "base", g, i),
            "extension": _parent_key(ref, "extension", g, j),
        }
    known = {index, *row, *col, *(summaries.neighbours_of(index) if summaries else ())}
    units = [*((latent, x) for x in known), *parents.values()]
    unit = _UnitPage(latent, index, top_k, intervals)
    own, examples, expl = reads.fetch_unit(unit, units)
    out = unit.build(reads, own, examples, expl.get((latent, index), []), mode, per_interval)
    neighbours = _neighbour_pairs(ref, own)
    missing = {x for x, _ in neighbours} - known
    if missing:  # the cached neighbours did not list them all (not for a finished harvest)
        expl.update(reads.explanations((latent, x) for x in missing))
    best = _best_texts(expl, latent)
    part = reads.part(latent)
    comp = None
    if coords is not None:
        g, i, j = coords
        comp = {
            "head": g,
            "base": i,
            "extension": j,
            "base_parent": _parent_brief(reads, "base", g, i, parents["base"], expl),
            "extension_parent": _parent_brief(reads, "extension", g, j, parents["extension"], expl),
            "row_siblings": _briefs(ref, part, row, best),
            "column_siblings": _briefs(ref, part, col, best),
        }
    near = [x for x, _ in neighbours]
    near_rows = part.rows(near).tolist() if part is not None and near else [-1] * len(near)
    out.update(
        sae=ref.slug,
        index=index,
        architecture=ref.architecture,
        composition=comp,
        logit_effects=_logit_effects(own),
        neighbours=[
            {
                "index": x,
                "cosine": c,
                "density": _f(part.frequency[r]) if part is not None and r >= 0 else None,
                "explanation": best.get(x),
            }
            for (x, c), r in zip(neighbours, near_rows, strict=True)
        ],
    )
    return out


# -- parents and heads -------------------------------------------------------------------------
def _require_kronsae(sae: SaeLike) -> tuple[int, int, int]:
    if not sae.is_kronsae:
        raise NotFound(
            f"{sae.slug} is a {sae.architecture} SAE: only KronSAEs have parents and heads.",
            detail={"architecture": sae.architecture},
        )
    assert sae.h and sae.m and sae.n
    return sae.h, sae.m, sae.n


def _check_head(sae: SaeLike, head: int) -> None:
    h, _, _ = _require_kronsae(sae)
    if not 0 <= head < h:
        raise NotFound(f"Head {head} is out of range: {sae.slug} has heads 0 to {h - 1}.")


@_current_sae
def parent_detail(
    session: Session | RawReader,
    sae: SaeLike | str,
    kind: ParentKind,
    head: int,
    index: int,
    *,
    top_k: int = 20,
    intervals: int = 5,
    mode: IntervalMode = "width",
    per_interval: int = 5,
) -> dict[str, Any]:
    reads = _Reads.open(session, sae)
    ref = reads.sae
    _check_head(ref, head)
    _, m, n = _require_kronsae(ref)
    size = m if kind == "base" else n
    if not 0 <= index < size:
        axis = "base parents" if kind == "base" else "extension parents"
        raise NotFound(
            f"{kind.capitalize()} parent {index} is out of range: each head has {axis} 0 to {size - 1}."
        )
    flat = head * size + index
    unit_kind = int(_PARENT_KIND[kind])
    if kind == "base":
        children = [head * m * n + index * n + j for j in range(n)]
    else:
        children = [head * m * n + i * n + index for i in range(m)]
    latent = int(UnitKind.LATENT)
    unit = _UnitPage(unit_kind, flat, top_k, intervals)
    units = [(unit_kind, flat), *((latent, c) for c in children)]
    stats, examples, expl = reads.fetch_unit(unit, units)
    out = unit.build(reads, stats, examples, expl.get((unit_kind, flat), []), mode, per_interval)
    out.update(
        sae=ref.slug,
        kind=kind,
        head=head,
        index=index,
        flat_index=flat,
        children=_briefs(ref, reads.part(latent), children, _best_texts(expl, latent)),
    )
    return out


@_current_sae
def head_grid(session: Session | RawReader, sae: SaeLike | str, head: int) -> dict[str, Any]:
    reads = _Reads.open(session, sae)
    ref = reads.sae
    _check_head(ref, head)
    _, m, n = _require_kronsae(ref)
    first = head * m * n
    indices = list(range(first, first + m * n))
    axes = {int(UnitKind.BASE): [head * m + x for x in range(m)],
            int(UnitKind.EXTENSION): [head * n + x for x in range(n)]}  # fmt: skip
    latent = int(UnitKind.LATENT)
    expl = reads.explanations(
        [*((latent, i) for i in indices), *((k, f) for k, flat in axes.items() for f in flat)]
    )
    cells = _briefs(ref, reads.part(latent), indices, _best_texts(expl, latent))

    def axis(unit: int) -> list[dict[str, Any]]:
        part = reads.part(unit)
        flat = axes[unit]
        rows = part.rows(flat).tolist() if part is not None else [-1] * len(flat)
        labels = _best_texts(expl, unit)
        return [
            {
                "index": x,
                "flat_index": f,
                "label": labels.get(f),
                "density": _f(part.frequency[r]) if part is not None and r >= 0 else None,
            }
            for x, (f, r) in enumerate(zip(flat, rows, strict=True))
        ]

    return {
        "sae": ref.slug,
        "head": head,
        "m": m,
        "n": n,
        "harvest_status": ref.harvest_status,
        "rows": axis(int(UnitKind.BASE)),
        "columns": axis(int(UnitKind.EXTENSION)),
        "cells": [cells[i * n : (i + 1) * n] for i in range(m)],
    }
