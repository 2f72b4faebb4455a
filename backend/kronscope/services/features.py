"""Feature pages assembled from the repositories: latent lists, one latent (with its mAND
composition), KronSAE parents and head grids. Nothing here loads a model: everything is
read from the SAE's active harvest and its explanations.

Every function returns plain dicts in the shape of the API's response models. Floats that
are not finite (a float16 overflow, an empty mean) become ``None`` or 0 so the JSON is
always valid. Each page costs a fixed number of queries, whatever F is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
from sqlalchemy.orm import Session

from ..db.models import Explanation, Harvest, Sae, UnitKind, UnitStats
from ..db.repositories import explanations as expl_repo
from ..db.repositories import stats as stats_repo
from ..db.repositories.examples import ExampleView
from ..db.repositories.stats import UnitBrief
from . import harvest_reads
from .errors import NotFound, Unprocessable
from .sae_registry import harvest_summary

SORTS = {"index": "index", "density": "frequency", "max_activation": "max_value"}
IntervalMode = Literal["width", "quantile"]
ParentKind = Literal["base", "extension"]
_PARENT_KIND = {"base": UnitKind.BASE, "extension": UnitKind.EXTENSION}


# -- small converters ------------------------------------------------------------------------
def _f(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _f0(x: Any) -> float:
    v = _f(x)
    return 0.0 if v is None else v


def stats_dict(s: UnitStats | UnitBrief | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "n_active": int(s.n_active),
        "density": _f0(s.frequency),
        "mean_activation": _f(s.mean_value),
        "max_activation": _f0(s.max_value),
        "both_parents_active": s.both_parents_active,
        "kept_count": s.kept_count,
    }


def histogram_dict(s: UnitStats | None) -> dict[str, Any] | None:
    if s is None or s.histogram is None or not s.histogram_edges:
        return None
    from ..db.codec import unpack_i64

    counts = [int(c) for c in unpack_i64(s.histogram)]
    edges = [_f0(e) for e in s.histogram_edges]
    if len(edges) != len(counts) + 1:
        return None
    return {"edges": edges, "counts": counts}


def explanation_dict(e: Explanation) -> dict[str, Any]:
    return {
        "id": e.id,
        "text": e.text,
        "source": e.source,
        "author": e.author,
        "score": _f(e.score),
        "created_at": e.created_at,
        "updated_at": e.updated_at,
    }


def example_dict(e: ExampleView) -> dict[str, Any]:
    values = np.nan_to_num(
        np.asarray(e.values, dtype=np.float64), nan=0.0, posinf=65504.0, neginf=-65504.0
    )
    return {
        "rank": e.rank,
        "context_id": e.context_id,
        "position": e.position,
        "tokens": e.tokens,
        "values": np.round(values, 4).tolist(),
        "max_value": _f0(e.max_value),
        "max_pos": e.max_pos,
        "sample_pos": e.sample_pos,
        "sample_value": _f(e.sample_value),
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
def coordinates(sae: Sae, index: int) -> tuple[int, int, int] | None:
    if not sae.is_kronsae:
        return None
    assert sae.m and sae.n
    g, rest = divmod(index, sae.m * sae.n)
    i, j = divmod(rest, sae.n)
    return g, i, j


def check_index(sae: Sae, index: int) -> None:
    if not 0 <= index < sae.d_sae:
        raise NotFound(
            f"Latent {index} is out of range: {sae.slug} has latents 0 to {sae.d_sae - 1}.",
            detail={"index": index, "d_sae": sae.d_sae},
        )


def _status(session: Session, sae: Sae) -> str:
    return harvest_summary(session, sae)[0] if sae.active_harvest_id is None else "complete"


def _best_texts(session: Session, sae: Sae, kind: int, indices: Iterable[int]) -> dict[int, str]:
    found = expl_repo.explanations_for_units(session, sae.id, kind, indices)
    return {i: items[0].text for i, items in found.items() if items}


def _brief(
    sae: Sae, index: int, s: UnitStats | UnitBrief | None, text: str | None
) -> dict[str, Any]:
    coords = coordinates(sae, index)
    return {
        "index": index,
        "head": coords[0] if coords else None,
        "base": coords[1] if coords else None,
        "extension": coords[2] if coords else None,
        "density": _f(s.frequency) if s else None,
        "max_activation": _f(s.max_value) if s else None,
        "mean_activation": _f(s.mean_value) if s else None,
        "n_active": int(s.n_active) if s else None,
        "explanation": text,
    }


def briefs(session: Session, sae: Sae, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Latent summaries for a set of indices (stats and best explanation), in that order."""
    kind = int(UnitKind.LATENT)
    stats = stats_repo.unit_briefs(session, sae, ((kind, i) for i in indices))
    texts = _best_texts(session, sae, kind, indices)
    return [_brief(sae, i, stats.get((kind, i)), texts.get(i)) for i in indices]


# -- latent list -------------------------------------------------------------------------------
def list_latents(
    session: Session,
    sae: Sae,
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
    if head is not None:
        if not sae.is_kronsae:
            raise Unprocessable(f"{sae.slug} is not a KronSAE, so it has no heads to filter by.")
        assert sae.h
        if not 0 <= head < sae.h:
            raise NotFound(f"Head {head} is out of range: {sae.slug} has heads 0 to {sae.h - 1}.")
    descending = (order or ("asc" if sort == "index" else "desc")) == "desc"
    total = None
    if sae.active_harvest_id is not None and has_explanation is None and not (q and q.strip()):
        # The count does not change for a finished harvest: cached, not redone per page.
        total = harvest_reads.list_total(
            session,
            sae.active_harvest_id,
            ("latent", min_density, max_density, head),
            lambda: stats_repo.count_units(
                session, sae, min_frequency=min_density, max_frequency=max_density, head=head
            ),
        )
    page = stats_repo.list_units(
        session,
        sae,
        sort=SORTS[sort],  # type: ignore[arg-type]
        descending=descending,
        min_frequency=min_density,
        max_frequency=max_density,
        head=head,
        has_explanation=has_explanation,
        q=q,
        limit=limit,
        offset=offset,
        total=total,
    )
    texts = _best_texts(session, sae, UnitKind.LATENT, [s.unit_index for s in page.items])
    return {
        "items": [_brief(sae, s.unit_index, s, texts.get(s.unit_index)) for s in page.items],
        "total": page.total,
        "limit": limit,
        "offset": offset,
        "harvest_status": _status(session, sae),
    }


# -- examples by interval ------------------------------------------------------------------------
def _intervals(
    samples: list[ExampleView], max_value: float, n: int, mode: IntervalMode, per_interval: int
) -> list[dict[str, Any]]:
    values = np.array([s.sample_value or 0.0 for s in samples], dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    top = max(_f0(max_value), float(values.max()) if values.size else 0.0)
    if mode == "quantile" and values.size:
        edges = np.quantile(values, np.linspace(0.0, 1.0, n + 1))
        edges[0] = min(0.0, float(edges[0]))
    else:
        edges = np.linspace(0.0, top, n + 1)
    edges[-1] = max(float(edges[-1]), top)
    groups: list[dict[str, Any]] = []
    for k in range(n):
        lo, hi = float(edges[k]), float(edges[k + 1])
        last = k == n - 1
        mask = (values >= lo) & ((values <= hi) if last else (values < hi))
        chosen = [samples[i] for i in np.flatnonzero(mask)]
        chosen.sort(key=lambda s: -(s.sample_value or 0.0))
        groups.append(
            {
                "index": k,
                "low": round(lo, 6),
                "high": round(hi, 6),
                "examples": [example_dict(s) for s in chosen[:per_interval]],
            }
        )
    return groups


def _unit_examples(
    session: Session,
    sae: Sae,
    kind: int,
    index: int,
    *,
    stats: UnitStats | None,
    explanations: list[Explanation],
    top_k: int,
    intervals: int,
    mode: IntervalMode,
    per_interval: int,
) -> dict[str, Any]:
    top, samples = harvest_reads.unit_examples(
        session, sae, kind, index, top_limit=top_k, samples=intervals > 0
    )
    return {
        "harvest_status": _status(session, sae),
        "harvest_id": sae.active_harvest_id,
        "stats": stats_dict(stats),
        "histogram": histogram_dict(stats),
        "explanations": [explanation_dict(e) for e in explanations],
        "top_examples": [example_dict(e) for e in top],
        "sampled_examples": (
            _intervals(samples, stats.max_value if stats else 0.0, intervals, mode, per_interval)
            if samples
            else []
        ),
        "interval_mode": mode,
    }


# -- one latent ----------------------------------------------------------------------------------
def _parent_key(sae: Sae, kind: ParentKind, head: int, within: int) -> tuple[int, int]:
    assert sae.m and sae.n
    size = sae.m if kind == "base" else sae.n
    return int(_PARENT_KIND[kind]), head * size + within


def _parent_brief(
    kind: ParentKind,
    head: int,
    within: int,
    key: tuple[int, int],
    stats: dict[tuple[int, int], UnitBrief],
    explanations: dict[tuple[int, int], list[Explanation]],
) -> dict[str, Any]:
    return {
        "kind": kind,
        "head": head,
        "index": within,
        "flat_index": key[1],
        "stats": stats_dict(stats.get(key)),
        "explanations": [explanation_dict(e) for e in explanations.get(key, [])],
    }


def _siblings(sae: Sae, index: int) -> tuple[list[int], list[int]]:
    coords = coordinates(sae, index)
    if coords is None:
        return [], []
    g, i, j = coords
    assert sae.m and sae.n
    first = g * sae.m * sae.n
    row = [first + i * sae.n + jj for jj in range(sae.n) if jj != j]
    col = [first + ii * sae.n + j for ii in range(sae.m) if ii != i]
    return row, col


def _neighbour_pairs(sae: Sae, s: UnitStats | None) -> list[tuple[int, float]]:
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


def _logit_effects(s: UnitStats | None) -> dict[str, Any] | None:
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


def latent_detail(
    session: Session,
    sae: Sae,
    index: int,
    *,
    top_k: int = 20,
    intervals: int = 5,
    mode: IntervalMode = "width",
    per_interval: int = 5,
) -> dict[str, Any]:
    """One latent's page in a fixed number of queries, whatever F is: the latent's own
    statistics; the summaries of its siblings, parents and neighbours together; the
    explanations of all of them together; its examples (and the cached vocabulary)."""
    check_index(sae, index)
    latent = int(UnitKind.LATENT)
    row, col = _siblings(sae, index)
    own = stats_repo.get_unit_stats(session, sae, latent, index)
    neighbours = _neighbour_pairs(sae, own)
    coords = coordinates(sae, index)
    parents: dict[ParentKind, tuple[int, int]] = {}
    if coords is not None:
        g, i, j = coords
        parents = {
            "base": _parent_key(sae, "base", g, i),
            "extension": _parent_key(sae, "extension", g, j),
        }
    units = [(latent, x) for x in {index, *row, *col, *(x for x, _ in neighbours)}]
    units += parents.values()
    stats = stats_repo.unit_briefs(session, sae, units)
    expl = expl_repo.explanations_for_keys(session, sae.id, units)
    best = {i: items[0].text for (k, i), items in expl.items() if k == latent and items}

    def brief(x: int) -> dict[str, Any]:
        return _brief(sae, x, stats.get((latent, x)), best.get(x))

    out = _unit_examples(
        session,
        sae,
        latent,
        index,
        stats=own,
        explanations=expl.get((latent, index), []),
        top_k=top_k,
        intervals=intervals,
        mode=mode,
        per_interval=per_interval,
    )
    comp = None
    if coords is not None:
        g, i, j = coords
        comp = {
            "head": g,
            "base": i,
            "extension": j,
            "base_parent": _parent_brief("base", g, i, parents["base"], stats, expl),
            "extension_parent": _parent_brief("extension", g, j, parents["extension"], stats, expl),
            "row_siblings": [brief(x) for x in row],
            "column_siblings": [brief(x) for x in col],
        }
    out.update(
        sae=sae.slug,
        index=index,
        architecture=sae.architecture,
        composition=comp,
        logit_effects=_logit_effects(own),
        neighbours=[
            {
                "index": x,
                "cosine": c,
                "density": _f(stats[(latent, x)].frequency) if (latent, x) in stats else None,
                "explanation": best.get(x),
            }
            for x, c in neighbours
        ],
    )
    return out


# -- parents and heads -------------------------------------------------------------------------
def _require_kronsae(sae: Sae) -> tuple[int, int, int]:
    if not sae.is_kronsae:
        raise NotFound(
            f"{sae.slug} is a {sae.architecture} SAE: only KronSAEs have parents and heads.",
            detail={"architecture": sae.architecture},
        )
    assert sae.h and sae.m and sae.n
    return sae.h, sae.m, sae.n


def _check_head(sae: Sae, head: int) -> None:
    h, _, _ = _require_kronsae(sae)
    if not 0 <= head < h:
        raise NotFound(f"Head {head} is out of range: {sae.slug} has heads 0 to {h - 1}.")


def parent_detail(
    session: Session,
    sae: Sae,
    kind: ParentKind,
    head: int,
    index: int,
    *,
    top_k: int = 20,
    intervals: int = 5,
    mode: IntervalMode = "width",
    per_interval: int = 5,
) -> dict[str, Any]:
    _check_head(sae, head)
    _, m, n = _require_kronsae(sae)
    size = m if kind == "base" else n
    if not 0 <= index < size:
        axis = "base parents" if kind == "base" else "extension parents"
        raise NotFound(
            f"{kind.capitalize()} parent {index} is out of range: each head has {axis} 0 to {size - 1}."
        )
    flat = head * size + index
    unit = _PARENT_KIND[kind]
    out = _unit_examples(
        session,
        sae,
        unit,
        flat,
        stats=stats_repo.get_unit_stats(session, sae, unit, flat),
        explanations=expl_repo.explanations_for_units(session, sae.id, unit, [flat]).get(flat, []),
        top_k=top_k,
        intervals=intervals,
        mode=mode,
        per_interval=per_interval,
    )
    if kind == "base":
        children = [head * m * n + index * n + j for j in range(n)]
    else:
        children = [head * m * n + i * n + index for i in range(m)]
    out.update(
        sae=sae.slug,
        kind=kind,
        head=head,
        index=index,
        flat_index=flat,
        children=briefs(session, sae, children),
    )
    return out


def head_grid(session: Session, sae: Sae, head: int) -> dict[str, Any]:
    _check_head(sae, head)
    _, m, n = _require_kronsae(sae)
    first = head * m * n
    indices = list(range(first, first + m * n))
    stats = {s.unit_index: s for s in stats_repo.head_grid(session, sae, head)}
    texts = _best_texts(session, sae, UnitKind.LATENT, indices)
    cells = [
        [
            _brief(
                sae, first + i * n + j, stats.get(first + i * n + j), texts.get(first + i * n + j)
            )
            for j in range(n)
        ]
        for i in range(m)
    ]

    def axis(unit: UnitKind, size: int) -> list[dict[str, Any]]:
        flat = [head * size + x for x in range(size)]
        st = stats_repo.unit_briefs(session, sae, ((unit, f) for f in flat))
        labels = _best_texts(session, sae, unit, flat)
        return [
            {
                "index": x,
                "flat_index": f,
                "label": labels.get(f),
                "density": _f(st[(unit, f)].frequency) if (unit, f) in st else None,
            }
            for x, f in enumerate(flat)
        ]

    return {
        "sae": sae.slug,
        "head": head,
        "m": m,
        "n": n,
        "harvest_status": _status(session, sae),
        "rows": axis(UnitKind.BASE, m),
        "columns": axis(UnitKind.EXTENSION, n),
        "cells": cells,
    }
