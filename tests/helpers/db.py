"""Database fixtures: the same tests on SQLite and on PostgreSQL.

- ``db_url`` (session, parametrised ``sqlite`` / ``postgresql``): a fresh SQLite file, or a
  freshly created PostgreSQL database ``kronscope_test_<random>`` on the server named by
  ``KRONSCOPE_TEST_POSTGRES_URL`` (dropped at the end). Without that variable the
  PostgreSQL half is skipped, with the reason.
- ``db_engine`` (session): an engine on it, migrated once with the real Alembic migrations.
- ``db_session`` (function): a session inside an outer transaction that is rolled back
  after the test; the code under test may commit (``join_transaction_mode=
  "create_savepoint"`` turns its commits into savepoints).
- ``db_scratch_engine`` (session): a second migrated database of the same kind, for tests
  that commit; ``db_committed`` (function) gives real-commit sessions on it (for tests that
  need several connections, e.g. concurrent workers) and empties it before and after;
  ``db_scratch_session`` is a rolled-back session on it (queries over all rows, such as
  the job queue, see nothing that other tests committed to ``db_url``).
- ``empty_db_url`` (function, parametrised): a brand-new, unmigrated database.
- ``make_sae``: a factory for SAE rows with unique slugs and hashes.

Import into a conftest with ``from helpers.db import *``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from kronscope.db.base import Base
from kronscope.db.engine import make_engine, upgrade
from kronscope.db.models import Sae
from kronscope.db.repositories import saes

PG_ENV = "KRONSCOPE_TEST_POSTGRES_URL"
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]

__all__ = [
    "BACKENDS",
    "PG_ENV",
    "db_committed",
    "db_engine",
    "db_scratch_engine",
    "db_scratch_session",
    "db_session",
    "db_url",
    "empty_db_url",
    "fresh_postgres_database",
    "make_sae",
    "new_database_url",
    "write_fake_harvest",
]


@contextlib.contextmanager
def fresh_postgres_database(base_url: str, *, keep: bool = False) -> Iterator[str]:
    """Create ``kronscope_test_<random>`` next to ``base_url``'s database; drop it after
    (unless ``keep``). The benchmarks use it too."""
    base = make_url(base_url)
    name = f"kronscope_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(
        base.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        if not keep:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextlib.contextmanager
def new_database_url(backend: str, tmp_dir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_dir / f'kronscope-{secrets.token_hex(4)}.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server to test against")
    with fresh_postgres_database(base) as url:
        yield url


@pytest.fixture(scope="session", params=BACKENDS)
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with new_database_url(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with new_database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def db_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def db_session(db_engine: Engine) -> Iterator[Session]:
    with db_engine.connect() as conn:
        outer = conn.begin()
        session = Session(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


def _empty_all_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(Sae).values(active_harvest_id=None))
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(scope="session")
def db_scratch_engine(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A second migrated database of ``db_url``'s kind, only for tests that commit: they
    may empty it at will without touching data other tests committed to ``db_url``."""
    backend = make_url(db_url).get_backend_name()
    with new_database_url(backend, tmp_path_factory.mktemp("scratch-db")) as url:
        engine = make_engine(url)
        upgrade(engine)
        yield engine
        engine.dispose()


@pytest.fixture
def db_committed(db_scratch_engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Sessions whose commits are real, on the scratch database (emptied before and after)."""
    _empty_all_tables(db_scratch_engine)
    try:
        yield sessionmaker(bind=db_scratch_engine, expire_on_commit=False)
    finally:
        _empty_all_tables(db_scratch_engine)


@pytest.fixture
def db_scratch_session(db_scratch_engine: Engine) -> Iterator[Session]:
    """Like ``db_session`` but on the scratch database: sees no data committed by others
    (for tests of global queries such as the job queue)."""
    with db_scratch_engine.connect() as conn:
        outer = conn.begin()
        session = Session(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


@pytest.fixture
def make_sae() -> Callable[..., Sae]:
    """``make_sae(session, **fields)``: a KronSAE (h=4, m=2, n=4, F=32) unless told otherwise."""

    def _make(session: Session, **fields: Any) -> Sae:
        token = secrets.token_hex(4)
        values: dict[str, Any] = {
            "slug": f"sae-{token}",
            "architecture": "kronsae",
            "d_in": 16,
            "d_sae": 32,
            "k": 4,
            "h": 4,
            "m": 2,
            "n": 4,
            "composition": "mand",
            "file_hash": secrets.token_hex(32),
            "storage_path": f"saes/{token}",
            "cfg": {"architecture": "kronsae", "d_in": 16, "d_sae": 32},
            "model_name": "tiny-lm",
            "hook_name": "blocks.0.hook_resid_post",
        }
        values.update(fields)
        return saes.create_sae(session, **values)

    return _make


def bench_harvest_row(
    session: Session, sae: Any, *, corpus: str, n_tokens: int, ctx_len: int
) -> int:
    """Register a live KronSAE module as SAE row ``bench`` and create a harvest row for it
    (the benchmarks write a real harvest into it); returns the harvest id."""
    from kronscope.db.repositories import harvests

    row = saes.create_sae(
        session,
        slug="bench",
        architecture="kronsae",
        d_in=sae.d_in,
        d_sae=sae.d_sae,
        k=sae.k,
        h=sae.h,
        m=sae.m,
        n=sae.n,
        file_hash="0" * 64,
        storage_path="saes/bench",
    )
    harvest = harvests.create_harvest(
        session, row.id, corpus_name=corpus, n_tokens=n_tokens, ctx_len=ctx_len
    )
    return harvest.id


def write_fake_harvest(
    session: Session,
    sae: Sae,
    *,
    complete: bool = True,
    ctx_len: int = 8,
    n_contexts: int = 16,
    top_per_unit: int = 3,
    samples_per_unit: int = 2,
    seed: int = 0,
) -> int:
    """Write a small, deterministic harvest for ``sae`` through the repositories (stats for
    every latent and parent, top and sampled examples); returns the harvest id."""
    import numpy as np

    from kronscope.db.models import ExampleKind, UnitKind
    from kronscope.db.repositories import examples, harvests, stats

    rng = np.random.default_rng(seed)
    harvest = harvests.create_harvest(
        session, sae.id, corpus_name="tiny", n_tokens=n_contexts * ctx_len, ctx_len=ctx_len
    )
    harvests.mark_running(session, harvest.id)
    vocab = {i: f"tok{i}" for i in range(50)}
    examples.add_tokens(session, harvest.id, vocab)
    ids = {
        pos: rng.integers(0, len(vocab), size=ctx_len)
        for pos in range(0, n_contexts * ctx_len, ctx_len)
    }
    context_ids = examples.add_contexts(session, harvest.id, ids.items())
    ctx_list = sorted(context_ids.values())

    units = [(UnitKind.LATENT, sae.d_sae)]
    if sae.is_kronsae:
        assert sae.h and sae.m and sae.n
        units += [(UnitKind.BASE, sae.h * sae.m), (UnitKind.EXTENSION, sae.h * sae.n)]
    rows: list[examples.ExampleRow] = []
    stat_rows: list[dict[str, Any]] = []
    for kind, count in units:
        for index in range(count):
            n_active = int(rng.integers(0, 100))
            top = sorted(rng.random(top_per_unit) * 10, reverse=True)
            stat_rows.append(
                {
                    "unit_kind": int(kind),
                    "unit_index": index,
                    "n_active": n_active,
                    "frequency": n_active / 1000,
                    "mean_value": float(np.mean(top)),
                    "max_value": float(top[0]),
                    "histogram": [n_active, 0, 1],
                    "histogram_edges": [0.0, 1.0, 2.0, 3.0],
                }
            )
            for rank, value in enumerate(top):
                values = rng.random(ctx_len).astype(np.float32)
                values[rank % ctx_len] = value
                rows.append(
                    examples.ExampleRow(
                        unit_kind=int(kind),
                        unit_index=index,
                        kind=int(ExampleKind.TOP),
                        rank=rank,
                        context_id=ctx_list[(index + rank) % len(ctx_list)],
                        values=values,
                    )
                )
            for rank in range(samples_per_unit):
                values = rng.random(ctx_len).astype(np.float32)
                rows.append(
                    examples.ExampleRow(
                        unit_kind=int(kind),
                        unit_index=index,
                        kind=int(ExampleKind.SAMPLE),
                        rank=rank,
                        context_id=ctx_list[(index * 7 + rank) % len(ctx_list)],
                        values=values,
                        sample_pos=1,
                        sample_value=float(values[1]),
                    )
                )
    examples.add_examples(session, harvest.id, rows)
    stats.add_stats(session, harvest.id, stat_rows)
    if complete:
        harvests.mark_complete(session, harvest.id, tokens_seen=n_contexts * ctx_len)
    session.flush()
    return harvest.id
