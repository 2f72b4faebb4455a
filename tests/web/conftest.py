"""Page-test fixtures: the real app (``create_app``) over a seeded database, on SQLite and
PostgreSQL (``helpers.db.db_url``), and HTML parsed the way a person reads it.

The seeded world (``World``):

- ``kron``: a harvested KronSAE (h=2, m=2, n=4, F=16) with explanations (one edited, so it
  has history), parent explanations, neighbours and logit effects on latent 5, a top
  example of latent 5 whose tokens are hostile or whitespace (``HOSTILE_TOKENS``), and
  latent 7 with no examples at all;
- ``topk``: a harvested TopK SAE (no composition);
- ``busy``: a KronSAE whose first harvest is still running, with a running job.

``page(client, path)`` fetches a page and returns a ``Page`` (status, soup, visible text).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from bs4 import BeautifulSoup
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from helpers.db import *  # noqa: F403
from helpers.db import write_fake_harvest
from kronscope.app import create_app
from kronscope.config import Settings
from kronscope.db import make_engine, upgrade
from kronscope.db.codec import pack_i32
from kronscope.db.models import Context, Example, ExampleKind, Sae, Token, UnitKind, UnitStats
from kronscope.db.repositories import explanations, harvests, jobs, keys, saes, stats

HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_TOKENS = [HOSTILE, " the", "\n", "\t", "\x07", "<script>alert(2)</script>", "end ", "&amp;"]
"""The tokens of latent 5's best example, in order (token ids 0..7 of the harvest)."""


@dataclass
class World:
    kron: str
    topk: str
    busy: str
    explained: int = 5
    explanation: str = "zebra stripes on animals"
    edited_from: str = "stripes"
    no_examples: int = 7
    base_explanation: str = "animal words"  # base parent 0 of head 1 (flat index 2)
    extension_explanation: str = "plural endings"  # extension parent 1 of head 1 (flat 5)
    sibling_explanation: str = "numbers and digits"  # latent 6: row sibling of 5


def _new_sae(s: Session, slug: str, **fields: Any) -> Sae:
    values: dict[str, Any] = {
        "architecture": "kronsae",
        "d_in": 32,
        "d_sae": 16,
        "k": 2,
        "h": 2,
        "m": 2,
        "n": 4,
        "composition": "mand",
        "file_hash": secrets.token_hex(32),
        "storage_path": f"saes/{slug}",
        "model_name": "tiny-gpt2",
        "hook_name": "transformer.h.1",
    }
    values.update(fields)
    return saes.create_sae(s, slug=slug, **values)


def _seed(factory: sessionmaker[Session]) -> World:
    token = secrets.token_hex(3)
    world = World(kron=f"web-kron-{token}", topk=f"web-topk-{token}", busy=f"web-busy-{token}")
    with factory() as s:
        kron = _new_sae(s, world.kron, metrics={"fvu": 0.25, "l0": 2.0})
        topk = _new_sae(
            s, world.topk, architecture="topk", h=None, m=None, n=None, composition=None
        )
        busy = _new_sae(s, world.busy)
        s.flush()
        hid = write_fake_harvest(s, kron, seed=1)
        write_fake_harvest(s, topk, seed=2)

        # Hostile and whitespace tokens in latent 5's best example.
        for tid, text in enumerate(HOSTILE_TOKENS):
            s.execute(
                sa.update(Token)
                .where(Token.harvest_id == hid, Token.token_id == tid)
                .values(text=text)
            )
        best = s.scalars(
            sa.select(Example).where(
                Example.harvest_id == hid,
                Example.unit_kind == int(UnitKind.LATENT),
                Example.unit_index == world.explained,
                Example.kind == int(ExampleKind.TOP),
                Example.rank == 0,
            )
        ).one()
        s.execute(
            sa.update(Context)
            .where(Context.id == best.context_id)
            .values(token_ids=pack_i32(list(range(len(HOSTILE_TOKENS)))))
        )
        # Latent 7 never fired.
        s.execute(
            sa.delete(Example).where(
                Example.harvest_id == hid,
                Example.unit_kind == int(UnitKind.LATENT),
                Example.unit_index == world.no_examples,
            )
        )
        s.execute(
            sa.update(UnitStats)
            .where(
                UnitStats.harvest_id == hid,
                UnitStats.unit_kind == int(UnitKind.LATENT),
                UnitStats.unit_index == world.no_examples,
            )
            .values(
                n_active=0,
                frequency=0.0,
                max_value=0.0,
                mean_value=None,
                histogram=None,
                histogram_edges=None,
            )
        )
        row = stats.get_unit_stats(s, kron, UnitKind.LATENT, world.explained)
        assert row is not None
        row.neighbours = [[6, 0.9], [1, 0.5]]
        row.logit_effects = {"top": [["cat", 1.5]], "bottom": [["dog", -0.5]]}
        row.both_parents_active = 40
        row.kept_count = 30
        first = explanations.create_explanation(
            s, kron.id, UnitKind.LATENT, world.explained, world.edited_from
        )
        explanations.update_explanation(s, first.id, world.explanation, author="tester")
        explanations.create_explanation(s, kron.id, UnitKind.LATENT, 6, world.sibling_explanation)
        explanations.create_explanation(s, kron.id, UnitKind.BASE, 2, world.base_explanation)
        explanations.create_explanation(
            s, kron.id, UnitKind.EXTENSION, 5, world.extension_explanation
        )
        explanations.create_explanation(
            s, topk.id, UnitKind.LATENT, 3, f"{HOSTILE} in an explanation"
        )

        running = harvests.create_harvest(
            s, busy.id, corpus_name="builtin", n_tokens=1000, ctx_len=8
        )
        harvests.mark_running(s, running.id)
        job = jobs.create_job(
            s, "harvest", sae_id=busy.id, harvest_id=running.id, progress_total=1000
        )
        job.status = "running"
        job.progress_done = 250
        s.commit()
    return world


@pytest.fixture(scope="session")
def web_db(db_url: str) -> Iterator[tuple[str, World]]:
    engine = make_engine(db_url)
    upgrade(engine)
    world = _seed(sessionmaker(bind=engine, expire_on_commit=False))
    engine.dispose()
    yield db_url, world


@pytest.fixture
def world(web_db: tuple[str, World]) -> World:
    return web_db[1]


@pytest.fixture
def db_factory(web_db: tuple[str, World]) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(web_db[0])
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def _settings(db_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "data_dir": data_dir,
        "database_url": db_url,
        "device": "cpu",
        "run_jobs_in_process": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_settings(web_db: tuple[str, World], tmp_path: Path) -> Callable[..., Settings]:
    """Settings of an app of one's own (``with TestClient(create_app(settings))``)."""
    return lambda **overrides: _settings(web_db[0], tmp_path / "data", **overrides)


@pytest.fixture(scope="module")
def shared_client(
    web_db: tuple[str, World], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    app = create_app(_settings(web_db[0], tmp_path_factory.mktemp("web") / "data"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def client(shared_client: TestClient) -> Iterator[TestClient]:
    """One app per module (starting one costs more than most page tests); a fresh browser
    (no cookies) per test."""
    shared_client.cookies.clear()
    yield shared_client
    shared_client.cookies.clear()


@dataclass
class Keys:
    all: str
    readonly: str
    revoked_id: int
    revoked: str


@pytest.fixture
def web_keys(db_factory: sessionmaker[Session]) -> Keys:
    """Fresh keys per test (a test may revoke one)."""
    with db_factory() as s:
        _, everything = keys.create_key(
            s, "web-tester", ["upload", "delete", "jobs", "explanations"]
        )
        _, readonly = keys.create_key(s, "web-reader", ["jobs"])
        row, soon_revoked = keys.create_key(s, "web-soon-revoked", ["explanations"])
        s.commit()
        return Keys(everything, readonly, row.id, soon_revoked)


# -- reading pages like a person --------------------------------------------------------------
@dataclass
class Page:
    status: int
    html: str
    soup: BeautifulSoup
    headers: Any

    @property
    def text(self) -> str:
        """The visible text, whitespace collapsed."""
        main = self.soup.find("main") or self.soup
        return " ".join(main.get_text(" ").split())

    def links(self) -> dict[str, str]:
        """Visible link text -> href (the last wins)."""
        return {
            " ".join(a.get_text(" ").split()): a.get("href", "") for a in self.soup.find_all("a")
        }

    def hrefs(self) -> set[str]:
        return {a.get("href", "") for a in self.soup.find_all("a")}


def read_page(client: TestClient, path: str) -> Page:
    response = client.get(path)
    html = response.text
    return Page(response.status_code, html, BeautifulSoup(html, "html.parser"), response.headers)


def csrf_of(page: Page) -> str:
    meta = page.soup.find("meta", attrs={"name": "csrf-token"})
    assert meta is not None
    return str(meta["content"])


def sign_in(client: TestClient, key: str) -> str:
    """Enter ``key`` on the key page like a person; returns the new CSRF token."""
    page = read_page(client, "/key")
    response = client.post(
        "/key",
        data={"api_key": key, "csrf_token": csrf_of(page), "next": "/"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return csrf_of(read_page(client, "/key"))
