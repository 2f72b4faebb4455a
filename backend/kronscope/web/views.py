"""View models: what the templates draw, computed from the services' dicts.

Pure functions over plain data (no database, no request): the histogram and density
charts as SVG geometry with readable axes, examples as shaded token windows, a parent's
top tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from .templating import fmt_num, fmt_pct, shade

# -- axes -------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


# -- activation histogram --------------------------------------------------------------------------
HIST_W, HIST_H = 560, 220
HIST_LEFT, HIST_RIGHT, HIST_TOP, HIST_BOTTOM = 64, 16, 12, 48


def histogram_chart(hist: dict[str, Any] | None) -> dict[str, Any] | None:
    """Bars, ticks and labels of an activation histogram (``{"edges", "counts"}``)."""
    if not hist or not hist.get("counts"):
        return None
    edges = [float(e) for e in hist["edges"]]
    counts = [int(c) for c in hist["counts"]]
    lo, hi = edges[0], edges[-1]
    if not hi > lo:
        return None
    top = max(counts) or 1
    plot_w = HIST_W - HIST_LEFT - HIST_RIGHT
    plot_h = HIST_H - HIST_TOP - HIST_BOTTOM

    def sx(v: float) -> float:
        return HIST_LEFT + (v - lo) / (hi - lo) * plot_w

    def sy(c: float) -> float:
        return HIST_TOP + plot_h - c / top * plot_h

    bars = []
    for k, c in enumerate(counts):
        x0, x1 = sx(edges[k]), sx(edges[k + 1])
        bars.append(
            {
                "x": round(x0, 2),
                "y": round(sy(c), 2),
                "w": round(max(x1 - x0 - 1, 0.5), 2),
                "h": round(plot_h - (sy(c) - HIST_TOP), 2),
                "title": f"{fmt_num(edges[k])} to {fmt_num(edges[k + 1])}: {c:,} tokens",
            }
        )
    xticks = [
        {"x": round(sx(t), 2), "label": fmt_num(t)} for t in nice_ticks(lo, hi, 6) if lo <= t <= hi
    ]
    yticks = [
        {"y": round(sy(t), 2), "label": fmt_num(int(t)) if t == int(t) else fmt_num(t)}
        for t in nice_ticks(0, top, 4)
        if 0 <= t <= top
    ]
    return {
        "width": HIST_W,
        "height": HIST_H,
        "left": HIST_LEFT,
        "right": HIST_W - HIST_RIGHT,
        "top": HIST_TOP,
        "bottom": HIST_TOP + plot_h,
        "bars": bars,
        "xticks": xticks,
        "yticks": yticks,
        "total": sum(counts),
        "x_label_x": HIST_LEFT + plot_w / 2,
        "x_label_y": HIST_H - 6,
        "y_label_x": 14,
        "y_label_y": HIST_TOP + plot_h / 2,
    }


# -- density on a log scale -------------------------------------------------------------------------
DENS_W, DENS_H = 560, 124
DENS_LEFT, DENS_RIGHT = 48, 40
DENS_AXIS_Y = 78


def _pct_label(exponent: int) -> str:
    """10**exponent as a plain percentage: -6 -> '0.0001%', 0 -> '100%'."""
    return format(Decimal(10) ** (exponent + 2), "f") + "%"


def density_chart(markers: Sequence[tuple[str, float | None]]) -> dict[str, Any] | None:
    """Densities (fraction of tokens) of a unit and its relatives on one log10 axis."""
    known = [(label, d) for label, d in markers if d is not None and d > 0]
    if not known:
        return None
    low_exp = min(-6, math.floor(math.log10(min(d for _, d in known))))
    plot_w = DENS_W - DENS_LEFT - DENS_RIGHT

    def sx(d: float) -> float:
        return DENS_LEFT + (math.log10(d) - low_exp) / -low_exp * plot_w

    step = 1 if -low_exp <= 6 else 2
    ticks = [{"x": round(sx(10.0**e), 2), "label": _pct_label(e)} for e in range(low_exp, 1, step)]
    points = []
    for n, (label, d) in enumerate(known):
        points.append(
            {
                "x": round(sx(min(d, 1.0)), 2),
                "label": label,
                "value": fmt_pct(d),
                "row": n,
                "y": DENS_AXIS_Y - 16 - 18 * min(n, 3),
                "primary": n == 0,
            }
        )
    return {
        "width": DENS_W,
        "height": DENS_H,
        "left": DENS_LEFT,
        "right": DENS_W - DENS_RIGHT,
        "axis_y": DENS_AXIS_Y,
        "ticks": ticks,
        "points": points,
    }


# -- examples ----------------------------------------------------------------------------------------
WINDOW_BEFORE = 32
WINDOW_AFTER = 16


def example_view(
    example: dict[str, Any],
    scale: float | None,
    *,
    before: int = WINDOW_BEFORE,
    after: int = WINDOW_AFTER,
) -> dict[str, Any]:
    """An example as a window of shaded tokens around its maximum (or its sampled token)."""
    tokens: Sequence[str] = example["tokens"]
    values: Sequence[float] = example["values"]  # a float64 array from services.features
    max_pos = int(example["max_pos"])
    sample_pos = example.get("sample_pos")
    centre = int(sample_pos) if sample_pos is not None else max_pos
    top = scale if scale and scale > 0 else float(example.get("max_value") or 0)
    start = max(0, centre - before)
    stop = min(len(tokens), centre + after + 1)
    return {
        "tokens": [
            {
                "text": tokens[p],
                "value": values[p] if p < len(values) else 0.0,
                "level": shade(values[p] if p < len(values) else 0.0, top),
                "is_max": p == max_pos,
                "is_sample": sample_pos is not None and p == int(sample_pos),
            }
            for p in range(start, stop)
        ],
        "cut_left": start > 0,
        "cut_right": stop < len(tokens),
        "max_value": example.get("max_value"),
        "sample_value": example.get("sample_value"),
        "position": example.get("position"),
        "context_id": example.get("context_id"),
    }


def top_tokens(examples: Sequence[dict[str, Any]], limit: int = 6) -> list[tuple[str, int]]:
    """The tokens where a unit's top examples peak, most frequent first."""
    counts: Counter[str] = Counter()
    for ex in examples:
        pos = int(ex["max_pos"])
        if 0 <= pos < len(ex["tokens"]):
            counts[ex["tokens"][pos]] += 1
    return counts.most_common(limit)


def and_numbers(stats: dict[str, Any] | None, tokens_seen: int | None) -> dict[str, Any] | None:
    """The AND of a KronSAE latent: tokens where both parents fired, and how many TopK kept."""
    if not stats or stats.get("both_parents_active") is None:
        return None
    both = int(stats["both_parents_active"])
    kept = stats.get("kept_count")
    return {
        "both": both,
        "kept": None if kept is None else int(kept),
        "ratio": (int(kept) / both) if kept is not None and both > 0 else None,
        "both_fraction": (both / tokens_seen) if tokens_seen else None,
    }


def heat_levels(values: Sequence[float | None], *, log: bool) -> list[int]:
    """Shading levels 0..10 of heat-map cells (log scale for densities)."""
    xs = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not xs:
        return [0 for _ in values]
    if not log:
        top = max(xs)
        return [shade(v or 0.0, top) for v in values]
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    out = []
    for v in values:
        if v is None or v <= 0:
            out.append(0)
        elif hi - lo < 1e-9:
            out.append(10)
        else:
            out.append(max(1, min(10, 1 + round(9 * (math.log10(v) - lo) / (hi - lo)))))
    return out
