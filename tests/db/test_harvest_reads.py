"""The feature pages' cached reads of finished harvests (``services.harvest_reads``)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from helpers.db import write_fake_harvest
from kronscope.db.models import Sae, UnitKind
from kronscope.db.repositories import examples, harvests, saes
from kronscope.services import harvest_reads


def _key(view: examples.ExampleView) -> tuple[object, ...]:
    return (view.id, view.kind, view.rank, view.context_id, view.tokens, view.values.tolist())


def test_unit_examples_equal_the_separate_reads(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    write_fake_harvest(db_session, sae, top_per_unit=3, samples_per_unit=2)
    harvest_reads.clear_cache()
    for kind, index in [(UnitKind.LATENT, 5), (UnitKind.BASE, 2), (UnitKind.EXTENSION, 7)]:
        top, sampled = harvest_reads.unit_examples(db_session, sae, kind, index, top_limit=2)
        want_top = examples.top_examples(db_session, sae, kind, index, limit=2)
        want_sampled = examples.sampled_examples(db_session, sae, kind, index)
        assert len(want_top) == 2 and len(want_sampled) == 2
        assert [_key(v) for v in top] == [_key(v) for v in want_top]
        assert [_key(v) for v in sampled] == [_key(v) for v in want_sampled]
    top, sampled = harvest_reads.unit_examples(db_session, sae, 0, 5, top_limit=0)
    assert top == [] and len(sampled) == 2
    top, sampled = harvest_reads.unit_examples(db_session, sae, 0, 5, samples=False)
    assert len(top) == 3 and sampled == []


def test_list_total_is_cached_per_finished_harvest(
    db_session: Session, make_sae: Callable[..., Sae]
) -> None:
    sae = make_sae(db_session)
    first = write_fake_harvest(db_session, sae, seed=1)
    harvest_reads.clear_cache()
    calls: list[int] = []

    def count(value: int) -> Callable[[], int]:
        def run() -> int:
            calls.append(value)
            return value

        return run

    assert harvest_reads.list_total(db_session, first, ("f", 0.1), count(7)) == 7
    assert harvest_reads.list_total(db_session, first, ("f", 0.1), count(99)) == 7  # cached
    assert harvest_reads.list_total(db_session, first, ("f", 0.2), count(3)) == 3  # other filter
    assert calls == [7, 3]

    # A harvest still running is never cached; once complete, it has its own entries.
    second = write_fake_harvest(db_session, sae, seed=2, complete=False)
    assert harvest_reads.list_total(db_session, second, ("f", 0.1), count(5)) == 5
    assert harvest_reads.list_total(db_session, second, ("f", 0.1), count(6)) == 6
    harvests.mark_complete(db_session, second)
    assert harvest_reads.list_total(db_session, second, ("f", 0.1), count(8)) == 8
    assert harvest_reads.list_total(db_session, second, ("f", 0.1), count(9)) == 8
    reloaded = saes.get_sae_by_slug(db_session, sae.slug)
    assert reloaded is not None and reloaded.active_harvest_id == second
