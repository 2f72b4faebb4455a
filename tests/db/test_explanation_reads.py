"""Explanation change numbers (``explanation.seq``, alembic 0003) and the pages' cache of
explanations that follows them (``services.explanation_reads``), on both databases."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from helpers.db import write_fake_harvest
from kronscope.api.deps import dumps
from kronscope.db.base import utcnow
from kronscope.db.models import Explanation, Sae, UnitKind
from kronscope.db.raw import RawReader
from kronscope.db.repositories import explanations as ex
from kronscope.db.repositories import pages
from kronscope.services import explanation_reads, features


def _seq(session: Session, explanation_id: int) -> int:
    return int(session.scalar(sa.select(Explanation.seq).where(Explanation.id == explanation_id)))


def _largest(session: Session, sae: Sae) -> int:
    return pages.sae_and_seq_by_slug(RawReader.of(session), sae.slug)[1]


@pytest.fixture
def kron(db_session: Session, make_sae: Callable[..., Sae]) -> Sae:
    sae = make_sae(db_session)  # F = 32: h=4, m=2, n=4
    write_fake_harvest(db_session, sae, seed=3)
    db_session.refresh(sae)
    return sae


def test_every_write_gets_a_larger_seq(db_session: Session, kron: Sae, make_sae: Any) -> None:
    assert _largest(db_session, kron) == 0
    e = ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 3, "first")
    first = _seq(db_session, e.id)
    assert first > 0 and _largest(db_session, kron) == first
    ex.update_explanation(db_session, e.id, "second")
    second = _seq(db_session, e.id)
    assert second > first
    e.score = 0.5  # any change of the row, through the ORM or not
    db_session.flush()
    third = _seq(db_session, e.id)
    assert third > second
    ex.delete_explanation(db_session, e.id)
    fourth = _seq(db_session, e.id)
    assert fourth > third and _largest(db_session, kron) == fourth
    other = make_sae(db_session)
    ex.create_explanation(db_session, other.id, UnitKind.LATENT, 1, "elsewhere")
    db_session.execute(
        sa.text(
            "INSERT INTO explanation (sae_id, unit_kind, unit_index, text, source, created_at, "
            "updated_at) VALUES (:sae, 0, 4, 'raw SQL', 'human', :now, :now)"
        ),
        {"sae": kron.id, "now": utcnow()},
    )
    raw = db_session.scalar(sa.select(Explanation.seq).where(Explanation.text == "raw SQL"))
    assert raw > fourth and _largest(db_session, kron) == raw


def test_writers_of_one_sae_commit_in_seq_order(
    db_committed: sessionmaker[Session], make_sae: Any
) -> None:
    """PostgreSQL: a second writer of the same SAE waits for the first to commit, so a
    reader that sees a number has seen every smaller one (SQLite serialises all writers)."""
    with db_committed() as s:
        if s.bind.dialect.name != "postgresql":  # type: ignore[union-attr]
            pytest.skip("SQLite has one writer at a time")
        sae = make_sae(s)
        s.commit()
        sae_id = sae.id
    first = db_committed()
    ex.create_explanation(first, sae_id, UnitKind.LATENT, 1, "first writer")
    done: list[int] = []

    def second_writer() -> None:
        with db_committed() as s2:
            e = ex.create_explanation(s2, sae_id, UnitKind.LATENT, 2, "second writer")
            s2.commit()
            done.append(_seq(s2, e.id))

    thread = threading.Thread(target=second_writer)
    thread.start()
    time.sleep(0.5)
    assert done == []  # waiting for the first writer
    first_seq = int(first.scalar(sa.select(sa.func.max(Explanation.seq))))
    first.commit()
    first.close()
    thread.join(10)
    assert done and done[0] > first_seq


def _page_texts(session: Session, sae: Sae, index: int) -> list[str]:
    page = features.latent_detail(session, sae.slug, index)
    return [e["text"] for e in page["explanations"]]


def test_pages_show_every_change_on_the_next_page(db_session: Session, kron: Sae) -> None:
    assert _page_texts(db_session, kron, 5) == []  # loads the (empty) cache
    a = ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 5, "alpha", score=0.1)
    assert _page_texts(db_session, kron, 5) == ["alpha"]
    b = ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 5, "beta", score=0.9)
    assert _page_texts(db_session, kron, 5) == ["beta", "alpha"]
    ex.update_explanation(db_session, a.id, "alpha, revised", score=1.0)
    assert _page_texts(db_session, kron, 5) == ["alpha, revised", "beta"]
    ex.delete_explanation(db_session, a.id)
    assert _page_texts(db_session, kron, 5) == ["beta"]
    # The list, a sibling's composition and a parent's page follow too.
    ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 4, "a row sibling")
    ex.create_explanation(db_session, kron.id, UnitKind.BASE, 1, "the base parent")  # (0, 1, 1)
    page = features.latent_detail(db_session, kron.slug, 5)
    comp = page["composition"]
    assert {s["index"]: s["explanation"] for s in comp["row_siblings"]}[4] == "a row sibling"
    assert [e["text"] for e in comp["base_parent"]["explanations"]] == ["the base parent"]
    listing = features.list_latents(db_session, kron.slug, limit=8)
    assert {i["index"]: i["explanation"] for i in listing["items"]}[5] == "beta"
    ex.delete_explanation(db_session, b.id)
    listing = features.list_latents(db_session, kron.slug, limit=8)
    assert {i["index"]: i["explanation"] for i in listing["items"]}[5] is None


def test_cache_order_equals_the_database_order(db_session: Session, kron: Sae) -> None:
    rng = random.Random(4)
    base = utcnow()
    for n in range(60):
        kind = rng.choice([UnitKind.LATENT, UnitKind.BASE, UnitKind.EXTENSION])
        index = rng.randrange(8)
        e = ex.create_explanation(
            db_session,
            kron.id,
            kind,
            index,
            f"text {n}",
            score=rng.choice([None, 0.5, 0.25, rng.random()]),
        )
        e.updated_at = base + timedelta(seconds=rng.choice([0, 1, 2]))
        if rng.random() < 0.2:
            e.deleted_at = base
    db_session.flush()
    reader = RawReader.of(db_session)
    ref, seq = pages.sae_and_seq_by_slug(reader, kron.slug)
    assert ref is not None
    units = [(int(k), i) for k in UnitKind for i in range(8)]
    want = pages.explanations(reader, kron.id, units)
    entry = explanation_reads.cached(reader, ref)
    assert entry is not None
    got = explanation_reads.explanations(reader, entry, ref, seq, units)
    assert {u: [e.id for e in v] for u, v in got.items()} == {
        u: [e.id for e in v] for u, v in want.items()
    }


def test_catching_up_in_batches(
    db_session: Session, kron: Sae, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(explanation_reads, "CHANGE_BATCH", 2)
    assert _page_texts(db_session, kron, 7) == []
    for n in range(5):
        ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 7, f"n{n}", score=n / 10)
    assert _page_texts(db_session, kron, 7) == [f"n{n}" for n in reversed(range(5))]


def test_an_sae_with_too_many_is_read_per_page(
    db_session: Session, kron: Sae, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        ex.create_explanation(db_session, kron.id, UnitKind.LATENT, i, f"latent {i}")
    cached_page = dumps(features.latent_detail(db_session, kron.slug, 1))
    cached_list = dumps(features.list_latents(db_session, kron.slug, limit=8))
    explanation_reads.clear_cache()
    monkeypatch.setattr(explanation_reads, "SAE_MAX_ROWS", 3)
    assert explanation_reads.cached(RawReader.of(db_session), _ref(db_session, kron)) is None
    assert dumps(features.latent_detail(db_session, kron.slug, 1)) == cached_page
    assert dumps(features.list_latents(db_session, kron.slug, limit=8)) == cached_list
    ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 1, "one more", score=1.0)
    assert _page_texts(db_session, kron, 1)[0] == "one more"


def test_an_sae_that_grows_past_the_bound_is_dropped(
    db_session: Session, kron: Sae, monkeypatch: pytest.MonkeyPatch
) -> None:
    explanation_reads.clear_cache()
    ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 1, "one")
    assert _page_texts(db_session, kron, 1) == ["one"]
    monkeypatch.setattr(explanation_reads, "SAE_MAX_ROWS", 2)
    for i in range(3):
        ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 2, f"two {i}")
    assert len(_page_texts(db_session, kron, 2)) == 3  # caught up, now over the bound
    assert explanation_reads.cached(RawReader.of(db_session), _ref(db_session, kron)) is None
    assert len(_page_texts(db_session, kron, 2)) == 3  # read per page


def _ref(session: Session, sae: Sae) -> pages.SaeRef:
    ref = pages.sae_by_slug(RawReader.of(session), sae.slug)
    assert ref is not None
    return ref


def test_the_cache_key_is_the_sae_not_just_its_id(db_session: Session, kron: Sae) -> None:
    """SQLite may give a deleted SAE's id to a new one: its created_at tells them apart."""
    ref = _ref(db_session, kron)
    reader = RawReader.of(db_session)
    assert explanation_reads.cached(reader, ref) is not None
    ex.create_explanation(db_session, kron.id, UnitKind.LATENT, 3, "new")
    reborn = pages.SaeRef(**{**ref.__dict__, "created_at": utcnow() + timedelta(days=1)})
    fresh = explanation_reads.cached(reader, reborn)
    assert fresh is not None and fresh is not explanation_reads.cached(reader, ref)
    assert [e.text for e in fresh.lookup([(0, 3)])[(0, 3)]] == ["new"]
