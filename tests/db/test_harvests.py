"""Harvest lifecycle: atomic visibility, resume, clean-up, cascades, page reads of examples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from helpers.db import write_fake_harvest
from kronscope.db import Conflict
from kronscope.db.codec import pack_f16
from kronscope.db.models import (
    Context,
    Example,
    ExampleKind,
    Explanation,
    ExplanationRevision,
    Harvest,
    HarvestStatus,
    Job,
    Sae,
    Token,
    UnitKind,
    UnitStats,
)
from kronscope.db.repositories import examples, explanations, harvests, jobs, saes, stats


def _count(session: Session, model: type, **where: object) -> int:
    stmt = sa.select(sa.func.count()).select_from(model)
    for name, value in where.items():
        stmt = stmt.where(getattr(model, name) == value)
    return session.scalar(stmt) or 0


def test_sae_lookup_and_duplicates(db_session: Session, make_sae: Callable[..., Sae]) -> None:
    sae = make_sae(db_session, slug="kron-a", file_hash="a" * 64)
    assert saes.get_sae_by_slug(db_session, "kron-a") is sae
    assert saes.get_sae_by_hash(db_session, "a" * 64) is sae
    with pytest.raises(Conflict) as same_file:
        make_sae(db_session, slug="kron-b", file_hash="a" * 64)
    assert same_file.value.existing_id == sae.id
    with pytest.raises(Conflict):
        make_sae(db_session, slug="kron-a")
    page = saes.list_saes(db_session)
    assert sae in page.items and page.total >= 1


def test_running_harvest_is_invisible_until_complete(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    first = write_fake_harvest(db_session, sae, seed=1)
    assert sae.active_harvest_id == first
    shown_before = stats.list_units(db_session, sae, limit=1000)
    assert shown_before.total == sae.d_sae

    second = write_fake_harvest(db_session, sae, seed=2, complete=False)
    db_session.expire_all()
    reloaded = saes.get_sae_by_slug(db_session, sae.slug)  # as a new request would
    assert reloaded is not None
    sae = reloaded
    # Everything is written, but pages still show the first harvest, unchanged.
    assert sae.active_harvest_id == first
    assert harvests.get_active_harvest(db_session, sae.id).id == first  # type: ignore[union-attr]
    now = stats.list_units(db_session, sae, limit=1000)
    assert [(u.unit_index, u.max_value) for u in now.items] == [
        (u.unit_index, u.max_value) for u in shown_before.items
    ]
    top = examples.top_examples(db_session, sae, UnitKind.LATENT, 0)
    assert top and all(ex.id for ex in top)
    assert {e.context_id for e in top} <= set(
        db_session.scalars(sa.select(Context.id).where(Context.harvest_id == first))
    )

    previous = harvests.mark_complete(db_session, second)
    assert previous == first
    assert sae.active_harvest_id == second  # the loaded object follows the flip
    after = stats.list_units(db_session, sae, limit=1000)
    assert [u.harvest_id for u in after.items] == [second] * sae.d_sae


def test_sae_without_harvest_shows_nothing(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    write_fake_harvest(db_session, sae, complete=False)
    assert stats.list_units(db_session, sae).total == 0
    assert examples.top_examples(db_session, sae, UnitKind.LATENT, 0) == []
    assert stats.get_unit_stats(db_session, sae, UnitKind.LATENT, 0) is None
    assert stats.head_grid(db_session, sae, 0) == []


def test_lifecycle_checkpoint_fail_resume(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    h = harvests.create_harvest(
        db_session, sae.id, corpus_name="c", n_tokens=1000, ctx_len=8, params={"seed": 3}
    )
    assert h.status == HarvestStatus.PENDING
    harvests.mark_running(db_session, h.id)
    started = h.started_at
    assert started is not None and started.tzinfo is not None
    harvests.save_checkpoint(db_session, h.id, {"batch": 7, "rng": [1, 2]}, tokens_seen=560)
    harvests.mark_failed(db_session, h.id, "CUDA out of memory")
    db_session.expire_all()
    h = harvests.get_harvest(db_session, h.id)  # type: ignore[assignment]
    assert h.status == "failed" and h.error == "CUDA out of memory"
    assert h.checkpoint == {"batch": 7, "rng": [1, 2]} and h.tokens_seen == 560

    harvests.mark_running(db_session, h.id)  # resume
    assert h.status == "running" and h.error is None and h.started_at == started
    harvests.mark_complete(db_session, h.id, tokens_seen=1000)
    assert h.status == "complete" and h.checkpoint is None and h.finished_at is not None
    with pytest.raises(Conflict):
        harvests.mark_running(db_session, h.id)
    with pytest.raises(Conflict):
        harvests.mark_failed(db_session, h.id, "late")
    cancelled = harvests.create_harvest(db_session, sae.id, corpus_name="c", n_tokens=1, ctx_len=8)
    assert harvests.mark_cancelled(db_session, cancelled.id).status == "cancelled"
    assert [x.id for x in harvests.list_harvests(db_session, sae.id)] == [cancelled.id, h.id]


def test_delete_partial_data(db_session: Session, make_sae: Callable[..., Sae]) -> None:
    sae = make_sae(db_session)
    active = write_fake_harvest(db_session, sae)
    partial = write_fake_harvest(db_session, sae, complete=False, seed=5)
    harvests.save_checkpoint(db_session, partial, {"batch": 1}, tokens_seen=8)
    with pytest.raises(Conflict):
        harvests.delete_partial_data(db_session, active)
    harvests.delete_partial_data(db_session, partial)
    for model in (Example, UnitStats, Context, Token):
        assert _count(db_session, model, harvest_id=partial) == 0
        assert _count(db_session, model, harvest_id=active) > 0
    db_session.expire_all()
    h = harvests.get_harvest(db_session, partial)
    assert h is not None and h.checkpoint is None and h.tokens_seen == 0


def test_delete_harvest_clears_active_pointer(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    hid = write_fake_harvest(db_session, sae)
    harvests.delete_harvest(db_session, hid)
    db_session.expire_all()
    assert saes.get_sae(db_session, sae.id).active_harvest_id is None  # type: ignore[union-attr]
    assert _count(db_session, Harvest, id=hid) == 0
    assert _count(db_session, Example, harvest_id=hid) == 0


def test_cascade_delete_of_an_sae(db_session: Session, make_sae: Callable[..., Sae]) -> None:
    keep = make_sae(db_session)
    keep_harvest = write_fake_harvest(db_session, keep)
    explanations.create_explanation(db_session, keep.id, 0, 1, "kept text about rivers")

    sae = make_sae(db_session)
    h1 = write_fake_harvest(db_session, sae)
    h2 = write_fake_harvest(db_session, sae, complete=False, seed=9)
    expl = explanations.create_explanation(db_session, sae.id, 0, 1, "doomed text about rivers")
    explanations.update_explanation(db_session, expl.id, "doomed text about lakes")
    job = jobs.create_job(db_session, "harvest", sae_id=sae.id, harvest_id=h2)
    sae_id, expl_id, job_id = sae.id, expl.id, job.id

    saes.delete_sae(db_session, sae)
    db_session.expire_all()
    assert saes.get_sae(db_session, sae_id) is None
    for hid in (h1, h2):
        for model in (Example, UnitStats, Context, Token):
            assert _count(db_session, model, harvest_id=hid) == 0
        assert _count(db_session, Harvest, id=hid) == 0
    assert _count(db_session, Explanation, sae_id=sae_id) == 0
    assert _count(db_session, ExplanationRevision, explanation_id=expl_id) == 0
    kept_job = db_session.get(Job, job_id)
    assert kept_job is not None and kept_job.sae_id is None and kept_job.harvest_id is None
    # the search index forgot it too; the other SAE is untouched
    assert explanations.search_explanations(db_session, "rivers", sae_id=sae_id).total == 0
    assert explanations.search_explanations(db_session, "rivers", sae_id=keep.id).total == 1
    assert _count(db_session, Example, harvest_id=keep_harvest) > 0
    if db_session.get_bind().dialect.name == "sqlite":
        n = db_session.execute(
            sa.text("SELECT count(*) FROM explanation_fts WHERE explanation_fts MATCH 'doomed'")
        ).scalar()
        assert n == 0


def test_raw_delete_cascades_through_the_cycle(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    """Even a plain DELETE (no repository) removes an SAE whose active harvest points back."""
    sae = make_sae(db_session)
    hid = write_fake_harvest(db_session, sae)
    db_session.execute(sa.text("DELETE FROM sae WHERE id = :id"), {"id": sae.id})
    assert _count(db_session, Harvest, id=hid) == 0
    assert _count(db_session, Example, harvest_id=hid) == 0


def test_examples_with_contexts_and_tokens(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    h = harvests.create_harvest(db_session, sae.id, corpus_name="c", n_tokens=8, ctx_len=4)
    examples.add_tokens(db_session, h.id, {10: "The", 11: " cat", 12: " sat", 13: "<0xF0>"})
    ctx = examples.add_contexts(
        db_session, h.id, [(100, [10, 11, 12, 13]), (104, [13, 12, 11, 99])]
    )
    rows = [
        examples.ExampleRow(0, 5, ExampleKind.TOP, 1, ctx[104], [0, 1, 2, 0]),
        examples.ExampleRow(0, 5, ExampleKind.TOP, 0, ctx[100], [0, 0, 3.5, 1]),
        examples.ExampleRow(
            0, 5, ExampleKind.SAMPLE, 0, ctx[100], [0.5, 0, 0, 0], sample_pos=0, sample_value=0.5
        ),
        examples.ExampleRow(
            0,
            5,
            ExampleKind.SAMPLE,
            1,
            ctx[104],
            pack_f16([0, 0, 2, 0]),
            sample_pos=2,
            sample_value=2.0,
        ),
        examples.ExampleRow(0, 6, ExampleKind.TOP, 0, ctx[104], [9, 0, 0, 0]),
    ]
    examples.add_examples(db_session, h.id, rows)
    harvests.mark_complete(db_session, h.id)

    top = examples.top_examples(db_session, sae, UnitKind.LATENT, 5)
    assert [(e.rank, e.position) for e in top] == [(0, 100), (1, 104)]
    assert top[0].tokens == ["The", " cat", " sat", "<0xF0>"]
    assert top[1].tokens == ["<0xF0>", " sat", " cat", "<99>"]  # unknown id: placeholder
    assert top[0].max_pos == 2 and top[0].max_value == pytest.approx(3.5)
    np.testing.assert_allclose(top[0].values, [0, 0, 3.5, 1])
    np.testing.assert_array_equal(top[0].token_ids, [10, 11, 12, 13])
    assert len(examples.top_examples(db_session, sae, UnitKind.LATENT, 5, limit=1)) == 1

    samples = examples.sampled_examples(db_session, sae, UnitKind.LATENT, 5)
    assert [s.sample_value for s in samples] == [0.5, 2.0]
    low = examples.sampled_examples(
        db_session, sae, UnitKind.LATENT, 5, min_value=0.0, max_value=1.0
    )
    assert [s.sample_pos for s in low] == [0]
    high = examples.sampled_examples(db_session, sae, UnitKind.LATENT, 5, min_value=1.0)
    assert [s.sample_pos for s in high] == [2]
