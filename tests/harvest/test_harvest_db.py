"""The whole harvest into a real database (SQLite and PostgreSQL): stored rows against the
brute-force reference, resume after a crash, atomic visibility, failures."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from harvest_ref import (
    assert_same_data,
    full_histogram,
    histogram_reference,
    reference_units,
    sample_reference,
    stored_rows,
    tiny_sae,
    top_reference,
)
from sqlalchemy.orm import Session, sessionmaker

from kronscope.db import DatabaseUnavailable, make_engine, make_sessionmaker
from kronscope.db.models import Harvest, Sae
from kronscope.db.repositories import saes
from kronscope.harvest import HarvestError, HarvestParams, HarvestState
from kronscope.harvest.runner import harvest, run_harvest
from kronscope.sae import SAE

PARAMS = HarvestParams(examples=4, samples=5, batch_size=8, seed=1, checkpoint_every=8)


def add_sae_row(factory: sessionmaker[Session], sae: SAE, slug: str | None = None) -> str:
    slug = slug or f"sae-{secrets.token_hex(4)}"
    cfg = sae.cfg
    with factory() as s:
        saes.create_sae(
            s,
            slug=slug,
            architecture=cfg.architecture,
            d_in=cfg.d_in,
            d_sae=cfg.d_sae,
            k=cfg.k,
            h=cfg.h,
            m=cfg.m,
            n=cfg.n,
            file_hash=secrets.token_hex(32),
            storage_path=f"saes/{slug}",
            model_name=cfg.model_name,
            hook_name=cfg.hook_name,
        )
        s.commit()
    return slug


def harvest_row(factory: sessionmaker[Session], harvest_id: int) -> Harvest:
    with factory() as s:
        row = s.get(Harvest, harvest_id)
        assert row is not None
        return row


def active_of(factory: sessionmaker[Session], slug: str) -> int | None:
    with factory() as s:
        return s.scalar(sa.select(Sae.active_harvest_id).where(Sae.slug == slug))


def row_count(engine: sa.Engine, harvest_id: int) -> int:
    with engine.connect() as c:
        return sum(
            c.execute(
                sa.text(f"SELECT count(*) FROM {t} WHERE harvest_id = :h"), {"h": harvest_id}
            ).scalar()
            for t in ("token", "context", "example", "unit_stats")
        )


def test_stored_rows_equal_brute_force(
    db_committed, db_scratch_engine, tiny_lm, contexts, tmp_path
):
    sae = tiny_sae("kronsae")
    slug = add_sae_row(db_committed, sae)
    hid = run_harvest(db_committed, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)
    assert active_of(db_committed, slug) == hid
    row = harvest_row(db_committed, hid)
    assert row.status == "complete" and row.checkpoint is None
    assert row.params["histogram_edges"] == PARAMS.hist_edges()
    valid = int((~contexts.special_mask).sum())
    assert row.params["tokens_valid"] == valid
    stored = stored_rows(db_scratch_engine, hid)

    refs = reference_units(sae, tiny_lm, contexts, PARAMS.batch_size)
    referenced: set[int] = set()
    for ref in refs:
        values = ref.values
        tops = top_reference(values, PARAMS.examples)
        samples = sample_reference(values, PARAMS.samples, PARAMS.seed)
        hist = histogram_reference(values, PARAMS)
        flat = values.reshape(-1, values.shape[-1])
        for u in range(values.shape[-1]):
            got_top = [stored["examples"][(ref.kind, u, 0, r)] for r in range(len(tops[u]))]
            assert (ref.kind, u, 0, len(tops[u])) not in stored["examples"]
            assert [e["ctx"] for e in got_top] == [c for c, _ in tops[u]], (ref.kind, u)
            for e, (c, v) in zip(got_top, tops[u], strict=True):
                assert e["max_value"] == pytest.approx(v, rel=1e-5, abs=1e-7)
                np.testing.assert_allclose(
                    e["values"], values[c, :, u].numpy(), rtol=2e-3, atol=1e-4
                )
                assert e["max_pos"] == int(values[c, :, u].argmax())
            got_s = [stored["examples"][(ref.kind, u, 1, r)] for r in range(len(samples[u]))]
            assert (ref.kind, u, 1, len(samples[u])) not in stored["examples"]
            assert [(e["ctx"], e["sample_pos"]) for e in got_s] == samples[u]
            for e in got_s:
                assert e["sample_value"] == pytest.approx(
                    float(values[e["ctx"], e["sample_pos"], u]), rel=1e-5
                )
                assert e["sample_value"] > 0
            referenced.update(e["ctx"] for e in got_top + got_s)
            st = stored["stats"][(ref.kind, u)]
            active = flat[:, u][flat[:, u] > 0]
            assert st["n_active"] == len(active)
            assert st["frequency"] == pytest.approx(len(active) / valid)
            if len(active):
                assert st["mean_value"] == pytest.approx(float(active.double().mean()), rel=1e-5)
                assert st["max_value"] == pytest.approx(float(active.max()), rel=1e-5)
            else:
                assert st["mean_value"] is None and st["histogram"] is None
            np.testing.assert_array_equal(full_histogram(st, PARAMS), hist[u])
            if ref.kind == 0:
                assert st["kept_count"] == st["n_active"]
                assert len(st["neighbours"]) == PARAMS.neighbours
                assert len(st["logit_effects"]["top"]) == PARAMS.logit_effects
            else:
                assert st["both_parents_active"] is None and st["neighbours"] is None
    # both parents active, per latent
    p, q = refs[1].values, refs[2].values
    pa = (p.reshape(-1, sae.h, sae.m) > 0).float()
    qa = (q.reshape(-1, sae.h, sae.n) > 0).float()
    both = torch.einsum("thi,thj->hij", pa, qa).reshape(-1).round().long().tolist()
    assert [stored["stats"][(0, f)]["both_parents_active"] for f in range(sae.d_sae)] == both
    # contexts: exactly the referenced ones, once, with their token ids and strings
    assert set(stored["contexts"]) == referenced
    for pos, ids in stored["contexts"].items():
        assert ids == contexts.input_ids[pos].tolist()
    used = sorted({t for ids in stored["contexts"].values() for t in ids})
    assert sorted(stored["tokens"]) == used
    assert [stored["tokens"][t] for t in used] == tiny_lm.token_strings(used)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_other_architectures_store(
    db_committed, db_scratch_engine, tiny_lm, contexts, tmp_path, arch
):
    sae = tiny_sae(arch)
    slug = add_sae_row(db_committed, sae)
    hid = run_harvest(db_committed, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)
    stored = stored_rows(db_scratch_engine, hid)
    assert {k for k, _ in stored["stats"]} == {0}
    assert len(stored["stats"]) == sae.d_sae
    assert all(st["both_parents_active"] is None for st in stored["stats"].values())
    tops = top_reference(
        reference_units(sae, tiny_lm, contexts, PARAMS.batch_size)[0].values, PARAMS.examples
    )
    for u in range(sae.d_sae):
        assert [stored["examples"][(0, u, 0, r)]["ctx"] for r in range(len(tops[u]))] == [
            c for c, _ in tops[u]
        ]


class Boom(RuntimeError):
    pass


def test_resume_after_crash_equals_uninterrupted(
    db_committed, db_scratch_engine, tiny_lm, contexts, tmp_path
):
    sae = tiny_sae("kronsae")
    # the uninterrupted run, under its own SAE row
    reference = run_harvest(
        db_committed,
        add_sae_row(db_committed, sae),
        sae,
        tiny_lm,
        contexts,
        PARAMS,
        work_dir=tmp_path,
    )
    slug = add_sae_row(db_committed, sae)

    def crash(batches: int) -> None:
        if batches == 2:
            raise Boom("killed after 2 batches")

    with pytest.raises(Boom):
        run_harvest(
            db_committed, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path, fault=crash
        )
    with db_committed() as s:
        (failed,) = s.scalars(
            sa.select(Harvest).join(Sae, Sae.id == Harvest.sae_id).where(Sae.slug == slug)
        )
    assert failed.status == "failed" and "killed after 2 batches" in (failed.error or "")
    assert failed.checkpoint["contexts_done"] == 16
    assert active_of(db_committed, slug) is None
    assert row_count(db_scratch_engine, failed.id) == 0
    assert (tmp_path / f"harvest-{failed.id}" / "state-r0-of1.json").is_file()

    out = harvest(db_committed, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)
    assert out.harvest_id == failed.id  # the same harvest, resumed
    assert out.resumed_from == 16
    assert active_of(db_committed, slug) == failed.id
    assert_same_data(
        stored_rows(db_scratch_engine, reference), stored_rows(db_scratch_engine, failed.id)
    )
    assert not (tmp_path / f"harvest-{failed.id}").exists()  # state removed once written


def test_atomic_visibility_and_failed_write(
    db_committed, db_scratch_engine, tiny_lm, contexts, tmp_path, monkeypatch
):
    sae = tiny_sae("kronsae")
    slug = add_sae_row(db_committed, sae)
    first = run_harvest(db_committed, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)
    first_rows = stored_rows(db_scratch_engine, first)
    params2 = HarvestParams(examples=3, samples=2, batch_size=8, seed=9, checkpoint_every=8)
    seen: list[tuple[int | None, int]] = []

    def watch(p) -> None:  # during the pass: the first harvest stays the visible one
        with db_committed() as s:
            newest = s.scalar(sa.select(sa.func.max(Harvest.id)))
        seen.append((active_of(db_committed, slug), row_count(db_scratch_engine, newest)))

    from kronscope.db.repositories import stats as stats_repo

    real_add_stats = stats_repo.add_stats

    def broken_add_stats(session, harvest_id, rows):
        real_add_stats(session, harvest_id, rows)  # rows are in the transaction...
        raise OSError(28, "No space left on device")  # ...when the disk fills up

    monkeypatch.setattr(stats_repo, "add_stats", broken_add_stats)
    with pytest.raises(OSError, match="No space left"):
        run_harvest(
            db_committed, slug, sae, tiny_lm, contexts, params2, work_dir=tmp_path, progress=watch
        )
    assert seen and all(a == first and n == 0 for a, n in seen)
    with db_committed() as s:
        second = s.scalar(sa.select(sa.func.max(Harvest.id)))
    row = harvest_row(db_committed, second)
    assert row.status == "failed" and "No space left" in (row.error or "")
    assert row_count(db_scratch_engine, second) == 0  # nothing half-written
    assert active_of(db_committed, slug) == first
    assert_same_data(first_rows, stored_rows(db_scratch_engine, first))

    monkeypatch.setattr(stats_repo, "add_stats", real_add_stats)
    out = harvest(db_committed, slug, sae, tiny_lm, contexts, params2, work_dir=tmp_path)
    assert out.harvest_id == second and out.resumed_from == len(contexts)  # no recompute
    assert active_of(db_committed, slug) == second
    assert harvest_row(db_committed, second).status == "complete"


def test_disk_full_while_saving_state(
    db_committed, db_scratch_engine, tiny_lm, contexts, tmp_path, monkeypatch
):
    sae = tiny_sae("kronsae")
    slug = add_sae_row(db_committed, sae)

    def full(self, directory, name="state"):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(HarvestState, "save", full)
    with pytest.raises(HarvestError, match=r"cannot save the harvest state.*No space left"):
        run_harvest(db_committed, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)
    with db_committed() as s:
        row = s.scalars(
            sa.select(Harvest).join(Sae, Sae.id == Harvest.sae_id).where(Sae.slug == slug)
        ).one()
    assert row.status == "failed" and "No space left" in row.error
    assert row_count(db_scratch_engine, row.id) == 0
    assert active_of(db_committed, slug) is None


def test_database_lost_then_resumed(db_committed, db_scratch_engine, tiny_lm, contexts, tmp_path):
    sae = tiny_sae("kronsae")
    reference = run_harvest(
        db_committed,
        add_sae_row(db_committed, sae),
        sae,
        tiny_lm,
        contexts,
        PARAMS,
        work_dir=tmp_path,
    )
    slug = add_sae_row(db_committed, sae)
    calls = {"n": 0}

    def flaky() -> Session:  # the database goes away after the harvest row is opened
        calls["n"] += 1
        if calls["n"] > 1:
            raise DatabaseUnavailable("the database at test cannot be reached: connection refused")
        return db_committed()

    with pytest.raises(HarvestError, match=r"could not be written.*run the same command again"):
        run_harvest(flaky, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)  # type: ignore[arg-type]
    with db_committed() as s:
        row = s.scalars(
            sa.select(Harvest).join(Sae, Sae.id == Harvest.sae_id).where(Sae.slug == slug)
        ).one()
    assert row.status == "running"  # it could not even be marked failed
    assert row_count(db_scratch_engine, row.id) == 0 and active_of(db_committed, slug) is None
    out = harvest(db_committed, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)
    assert out.harvest_id == row.id and out.resumed_from == len(contexts)
    assert_same_data(
        stored_rows(db_scratch_engine, reference), stored_rows(db_scratch_engine, row.id)
    )


def test_unreachable_database_fails_before_the_pass(tiny_lm, contexts, tmp_path: Path):
    sae = tiny_sae("kronsae")
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    factory = make_sessionmaker(engine)
    with pytest.raises(HarvestError, match=r"cannot start the harvest.*cannot be reached"):
        run_harvest(factory, "any", sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing computed, nothing saved


def test_bad_sae_width_fails_before_any_row(db_committed, tiny_lm, contexts, tmp_path):
    sae = tiny_sae("kronsae", d_in=24)
    slug = add_sae_row(db_committed, sae)
    with pytest.raises(HarvestError, match="d_in = 24"):
        run_harvest(db_committed, slug, sae, tiny_lm, contexts, PARAMS, work_dir=tmp_path)
    with db_committed() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Harvest)) == 0
