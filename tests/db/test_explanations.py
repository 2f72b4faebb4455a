"""Explanations: history, soft delete, per-unit lookup, full-text search on both databases."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy.orm import Session

from kronscope.db import NotFound
from kronscope.db.models import Sae, UnitKind
from kronscope.db.repositories import explanations as ex
from kronscope.db.repositories.search_syntax import parse_search_query

HOSTILE = [
    '"',
    '""',
    '"unbalanced phrase',
    "(",
    ")",
    "((cats)",
    "NEAR",
    "NEAR(cats dogs, 2)",
    "cats NEAR dogs",
    "*",
    "cat*",
    "^cats",
    "OR",
    "cats OR",
    "OR OR OR",
    "AND NOT",
    "NOT cats",
    "-",
    "--",
    "- cats",
    "text: cats",
    "{text}: cats",
    "cats:",
    "'; DROP TABLE explanation; --",
    "1 OR 1=1",
    "SELECT * FROM sae WHERE 1=1",
    "😀",
    "cats 😀 dogs",
    "🐱🐶",
    "\x00",
    "\ue000cats\ue001",
    "a" * 5000,
    "über café",
    "猫",
    "   ",
    "\\",
    "%_",
]


@pytest.fixture
def sae(db_scratch_session: Session, make_sae: Callable[..., Sae]) -> Sae:
    return make_sae(db_scratch_session)


def test_create_update_history_and_soft_delete(db_scratch_session: Session, sae: Sae) -> None:
    e = ex.create_explanation(
        db_scratch_session, sae.id, UnitKind.LATENT, 7, " cats ", author="ann"
    )
    assert e.text == "cats" and e.source == "human" and e.deleted_at is None
    ex.update_explanation(
        db_scratch_session, e.id, "cats and kittens", author="bob", source="llm:gpt-x"
    )
    ex.update_explanation(db_scratch_session, e.id, "felines", score=0.8)
    assert e.text == "felines" and e.source == "llm:gpt-x" and e.score == 0.8
    history = ex.explanation_history(db_scratch_session, e.id)
    assert [r.text for r in history] == ["cats", "cats and kittens", "felines"]
    assert [r.author for r in history] == ["ann", "bob", None]
    assert history[1].source == "llm:gpt-x"

    ex.delete_explanation(db_scratch_session, e.id)
    assert ex.get_explanation(db_scratch_session, e.id) is None
    assert ex.get_explanation(db_scratch_session, e.id, include_deleted=True) is not None
    assert ex.explanations_for_units(db_scratch_session, sae.id, UnitKind.LATENT, [7]) == {}
    assert ex.search_explanations(db_scratch_session, "felines").total == 0
    assert len(ex.explanation_history(db_scratch_session, e.id)) == 3  # history survives
    with pytest.raises(NotFound):
        ex.update_explanation(db_scratch_session, e.id, "again")
    with pytest.raises(NotFound):
        ex.delete_explanation(db_scratch_session, e.id)


def test_validation(db_scratch_session: Session, sae: Sae) -> None:
    with pytest.raises(ValueError):
        ex.create_explanation(db_scratch_session, sae.id, 0, 1, "x", source="robot")
    with pytest.raises(ValueError):
        ex.create_explanation(db_scratch_session, sae.id, 0, 1, "x", source="llm:")
    with pytest.raises(ValueError):
        ex.create_explanation(db_scratch_session, sae.id, 0, 1, "   ")
    with pytest.raises(ValueError):
        ex.create_explanation(db_scratch_session, sae.id, 9, 1, "x")
    assert (
        ex.create_explanation(db_scratch_session, sae.id, 0, 1, "x", source="heuristic").source
        == "heuristic"
    )


def test_explanations_for_units(db_scratch_session: Session, sae: Sae) -> None:
    a = ex.create_explanation(db_scratch_session, sae.id, UnitKind.LATENT, 1, "one", score=0.2)
    b = ex.create_explanation(db_scratch_session, sae.id, UnitKind.LATENT, 1, "uno", score=0.9)
    c = ex.create_explanation(db_scratch_session, sae.id, UnitKind.LATENT, 2, "two")
    ex.create_explanation(db_scratch_session, sae.id, UnitKind.BASE, 1, "base one")
    got = ex.explanations_for_units(db_scratch_session, sae.id, UnitKind.LATENT, [1, 2, 3])
    assert [e.id for e in got[1]] == [b.id, a.id]  # best score first
    assert [e.id for e in got[2]] == [c.id] and 3 not in got

    # Several kinds in one query: same order per unit, kinds kept apart.
    keys = [(UnitKind.LATENT, 1), (UnitKind.BASE, 1), (UnitKind.EXTENSION, 1), (0, 2)]
    both = ex.explanations_for_keys(db_scratch_session, sae.id, keys)
    assert sorted(both) == [
        (int(UnitKind.LATENT), 1),
        (int(UnitKind.LATENT), 2),
        (int(UnitKind.BASE), 1),
    ]
    assert [e.id for e in both[(int(UnitKind.LATENT), 1)]] == [b.id, a.id]
    assert [e.text for e in both[(int(UnitKind.BASE), 1)]] == ["base one"]
    assert ex.explanations_for_keys(db_scratch_session, sae.id, []) == {}


def test_search_ranks_relevant_first_with_highlights(
    db_scratch_session: Session, make_sae: Callable[..., Sae]
) -> None:
    s1, s2 = make_sae(db_scratch_session), make_sae(db_scratch_session)
    strong = ex.create_explanation(
        db_scratch_session, s1.id, 0, 1, "Python code: Python keywords and Python indentation"
    )
    weak = ex.create_explanation(
        db_scratch_session,
        s1.id,
        0,
        2,
        "Mentions of snakes, reptiles, zoos, animals, habitats, and once a python in a long text",
    )
    other = ex.create_explanation(db_scratch_session, s2.id, 0, 3, "python packaging tools")
    ex.create_explanation(db_scratch_session, s1.id, 0, 4, "French verbs")

    page = ex.search_explanations(db_scratch_session, "python")
    assert page.total == 3
    ids = [h.explanation.id for h in page.items]
    assert ids[0] == strong.id and ids.index(strong.id) < ids.index(weak.id)
    assert {h.sae_slug for h in page.items} == {s1.slug, s2.slug}
    assert page.items[0].rank >= page.items[-1].rank

    hit = page.items[0]
    marked = [t.lower() for t, is_match in hit.snippet if is_match]
    assert marked and all(t == "python" for t in marked)
    assert "".join(t for t, _ in hit.snippet).startswith("Python code")
    assert "<mark>Python</mark>" in hit.snippet_html

    only_s2 = ex.search_explanations(db_scratch_session, "python", sae_id=s2.id)
    assert [h.explanation.id for h in only_s2.items] == [other.id]
    paged = ex.search_explanations(db_scratch_session, "python", limit=1, offset=1)
    assert paged.total == 3 and [h.explanation.id for h in paged.items] == [ids[1]]

    # stemming, phrases, OR and exclusion behave alike on both databases
    assert {
        h.explanation.id for h in ex.search_explanations(db_scratch_session, "snake").items
    } == {weak.id}
    assert ex.search_explanations(db_scratch_session, '"python keywords"').total == 1
    assert ex.search_explanations(db_scratch_session, "verbs OR packaging").total == 2
    assert ex.search_explanations(db_scratch_session, "python -packaging").total == 2


def test_snippet_html_escapes_text(db_scratch_session: Session, sae: Sae) -> None:
    ex.create_explanation(
        db_scratch_session, sae.id, 0, 1, "<script>alert(1)</script> tags & python"
    )
    hit = ex.search_explanations(db_scratch_session, "python").items[0]
    assert "<script>" not in hit.snippet_html
    assert "&lt;script&gt;" in hit.snippet_html and "<mark>python</mark>" in hit.snippet_html


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise(db_scratch_session: Session, sae: Sae, query: str) -> None:
    ex.create_explanation(db_scratch_session, sae.id, 0, 1, "cats and dogs; NEAR the OR gate")
    page = ex.search_explanations(db_scratch_session, query, sae_id=sae.id)
    assert len(page.items) <= page.total
    from kronscope.db.repositories import stats

    stats.list_units(db_scratch_session, sae, q=query)  # the latent-list filter uses the same path


def test_operator_words_are_searched_as_words(db_scratch_session: Session, sae: Sae) -> None:
    ex.create_explanation(db_scratch_session, sae.id, 0, 1, "a NEAR miss with cats")
    assert ex.search_explanations(db_scratch_session, "near cats").total == 1
    assert ex.search_explanations(db_scratch_session, "cats*").total == 1


def test_parse_search_query() -> None:
    assert parse_search_query("") is None and parse_search_query("😀 ( )") is None
    q = parse_search_query('cats OR dogs "red fox" -wolf')
    assert q is not None
    assert q.to_fts5() == '(("cats" OR "dogs") AND ("red fox")) NOT ("wolf")'
    assert q.to_websearch() == '"cats" or "dogs" "red fox" -"wolf"'
    assert parse_search_query("-only -negatives") is None
