"""Token display, number formats and chart geometry (pure functions, no app)."""

from __future__ import annotations

import pytest

from kronscope.web import views
from kronscope.web.templating import fmt_num, fmt_pct, query_string, shade, visible_token

TOKEN_CASES = [
    ("the", "the"),
    (" the", "·the"),
    ("the  ", "the··"),
    ("a b", "a b"),  # inner spaces stay spaces
    ("   ", "···"),
    ("\n", "↵"),
    (" \n\n", "·↵↵"),
    ("\t", "⇥"),
    ("\r\n", "\\r↵"),
    ("\x00\x07\x1b", "\\x00\\x07\\x1b"),
    ("\x7f", "\\x7f"),
    ("\u200b", "\\u200b"),  # zero-width space
    ("\u202e", "\\u202e"),  # right-to-left override would reorder the display
    ("\u2028", "\\u2028"),
    ("<img src=x onerror=alert(1)>", "<img src=x onerror=alert(1)>"),  # escaping is Jinja's job
    ("é😀", "é😀"),
    ("", ""),
]
"""Shared with the browser test, which checks that tokens.js agrees."""


@pytest.mark.parametrize(("token", "shown"), TOKEN_CASES)
def test_visible_token(token: str, shown: str) -> None:
    assert visible_token(token) == shown


def test_shade_levels() -> None:
    assert shade(0, 5) == 0
    assert shade(-1, 5) == 0
    assert shade(0.001, 5) == 1  # anything active is visible
    assert shade(2.5, 5) == 5
    assert shade(5, 5) == 10
    assert shade(9, 5) == 10
    assert shade(1, 0) == 0
    assert shade(float("nan"), 5) == 0


def test_number_formats() -> None:
    assert fmt_num(None) == "—"
    assert fmt_num(1234567) == "1,234,567"
    assert fmt_num(3.14159) == "3.14"
    assert fmt_num(12345.6) == "12,346"
    assert fmt_num(0.00001234) == "1.23e-05"
    assert fmt_num(float("inf")) == "—"
    assert fmt_pct(0.093) == "9.30%"
    assert fmt_pct(0.00012) == "0.012%"
    assert fmt_pct(3e-7) == "3.0e-05%"
    assert fmt_pct(0) == "0%"


def test_query_string_keeps_filters_and_drops_empties() -> None:
    assert query_string({"sort": "density", "q": ""}, p=2) == "?sort=density&p=2"
    assert query_string({}) == ""
    assert query_string({"q": "a&b <c>"}) == "?q=a%26b+%3Cc%3E"


def test_nice_ticks() -> None:
    assert views.nice_ticks(0, 10, 6) == [0, 2, 4, 6, 8, 10]
    assert views.nice_ticks(0, 6.32, 6) == [0, 2, 4, 6]
    assert views.nice_ticks(0.5, 0.5) == [0.5]


def test_histogram_chart_has_readable_axes() -> None:
    chart = views.histogram_chart({"edges": [0.0, 1.0, 2.0, 3.0], "counts": [10, 0, 5]})
    assert chart is not None
    assert [b["title"] for b in chart["bars"]] == [
        "0 to 1: 10 tokens",
        "1 to 2: 0 tokens",
        "2 to 3: 5 tokens",
    ]
    assert chart["bars"][0]["h"] > chart["bars"][2]["h"] > chart["bars"][1]["h"] == 0
    assert [t["label"] for t in chart["xticks"]] == ["0", "1", "2", "3"]
    assert chart["yticks"][0]["label"] == "0"
    assert chart["total"] == 15
    assert views.histogram_chart(None) is None
    assert views.histogram_chart({"edges": [1.0, 1.0], "counts": [3]}) is None


def test_density_chart_places_markers_on_a_log_axis() -> None:
    chart = views.density_chart([("latent 5", 0.01), ("base parent", 0.1), ("missing", None)])
    assert chart is not None
    xs = [p["x"] for p in chart["points"]]
    assert len(xs) == 2 and xs[0] < xs[1]
    labels = [t["label"] for t in chart["ticks"]]
    assert labels[0] == "0.0001%" and labels[-1] == "100%"
    assert chart["points"][0]["primary"] and chart["points"][0]["value"] == "1.00%"
    assert views.density_chart([("dead", 0.0)]) is None


def test_example_view_windows_around_the_maximum() -> None:
    tokens = [f"t{i}" for i in range(100)]
    values = [0.0] * 100
    values[60] = 4.0
    values[61] = 1.0
    ex = {
        "tokens": tokens,
        "values": values,
        "max_pos": 60,
        "max_value": 4.0,
        "position": 7,
        "context_id": 1,
    }
    view = views.example_view(ex, scale=8.0, before=5, after=2)
    assert [t["text"] for t in view["tokens"]] == [f"t{i}" for i in range(55, 63)]
    assert view["cut_left"] and view["cut_right"]
    marked = [t for t in view["tokens"] if t["is_max"]]
    assert len(marked) == 1 and marked[0]["level"] == 5  # 4 on a scale of 8
    assert views.top_tokens([ex, ex]) == [("t60", 2)]


def test_and_numbers() -> None:
    numbers = views.and_numbers({"both_parents_active": 40, "kept_count": 30}, tokens_seen=128)
    assert numbers == {"both": 40, "kept": 30, "ratio": 0.75, "both_fraction": 40 / 128}
    assert views.and_numbers({"both_parents_active": None}, 10) is None
    assert views.and_numbers({"both_parents_active": 0, "kept_count": 0}, None)["ratio"] is None


def test_heat_levels() -> None:
    assert views.heat_levels([0.001, 0.01, 0.1, None, 0.0], log=True) == [1, 5, 10, 0, 0]
    assert views.heat_levels([1.0, 2.0], log=False) == [5, 10]
    assert views.heat_levels([None, 0.0], log=True) == [0, 0]
