"""API test fixtures: the real app (``create_app``) over SQLite and PostgreSQL.

- ``api_db`` (session, per backend): the migrated database with a seeded world
  (``Seeded``): a harvested KronSAE (h=2, m=2, n=4, F=16) with explanations, a harvested
  TopK SAE, and a KronSAE never harvested. Harvest data is written through the
  repositories (``helpers.db.write_fake_harvest``); the real harvest engine is exercised
  by ``test_jobs``.
- ``make_settings`` / ``client``: a fresh data dir per test, the tiny models as
  ``models_dir``, jobs not run in-process unless a test asks.
- ``keys``: plain API keys with every scope, and with one scope each.
"""

from __future__ import annotations

import io
import secrets
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from helpers.db import *  # noqa: F403
from helpers.db import write_fake_harvest
from kronscope.app import create_app
from kronscope.config import Settings
from kronscope.db import make_engine, upgrade
from kronscope.db.models import Sae, UnitKind
from kronscope.db.repositories import explanations, keys, saes
from kronscope.sae import SAEConfig, build
from kronscope.sae.checkpoint import save

PEERS = Path(__file__).resolve().parents[1] / "fixtures" / "peers"
if not PEERS.is_dir():  # pragma: no cover - the copy is committed
    PEERS = Path("/work/shared/fixtures/peers")
TINY_MODEL = "tiny-gpt2"
TINY_HOOK = "transformer.h.1"
TINY_D = 32
CHECKPOINT_NAMES = (
    "cfg.json",
    "sae_weights.safetensors",
    "sparsity.safetensors",
    "sae.safetensors",
    "ae.pt",
    "config.json",
)


@dataclass
class Seeded:
    kron: str
    topk: str
    unharvested: str
    explained_latent: int
    explanation_word: str


def _seed(factory: sessionmaker[Session]) -> Seeded:
    token = secrets.token_hex(3)
    with factory() as s:
        kron = saes.create_sae(
            s,
            slug=f"seed-kron-{token}",
            architecture="kronsae",
            d_in=TINY_D,
            d_sae=16,
            k=2,
            h=2,
            m=2,
            n=4,
            composition="mand",
            file_hash=secrets.token_hex(32),
            storage_path=f"saes/seed-kron-{token}",
            model_name=TINY_MODEL,
            hook_name=TINY_HOOK,
            metrics={"fvu": 0.25},
        )
        topk = saes.create_sae(
            s,
            slug=f"seed-topk-{token}",
            architecture="topk",
            d_in=TINY_D,
            d_sae=16,
            k=2,
            file_hash=secrets.token_hex(32),
            storage_path=f"saes/seed-topk-{token}",
            model_name=TINY_MODEL,
            hook_name=TINY_HOOK,
        )
        bare = saes.create_sae(
            s,
            slug=f"seed-bare-{token}",
            architecture="kronsae",
            d_in=TINY_D,
            d_sae=16,
            k=2,
            h=2,
            m=2,
            n=4,
            composition="mand",
            file_hash=secrets.token_hex(32),
            storage_path=f"saes/seed-bare-{token}",
            model_name=TINY_MODEL,
            hook_name=TINY_HOOK,
        )
        s.flush()
        write_fake_harvest(s, kron, seed=1)
        write_fake_harvest(s, topk, seed=2)
        # Neighbours and logit effects on latent 5 of the KronSAE (the fake harvest has none).
        from kronscope.db.repositories import stats

        row = stats.get_unit_stats(s, kron, UnitKind.LATENT, 5)
        assert row is not None
        row.neighbours = [[6, 0.9], [1, 0.5]]
        row.logit_effects = {"top": [["cat", 1.5]], "bottom": [["dog", -0.5]]}
        explanations.create_explanation(s, kron.id, UnitKind.LATENT, 5, "zebra stripes on animals")
        explanations.create_explanation(s, kron.id, UnitKind.LATENT, 6, "numbers and digits")
        explanations.create_explanation(s, kron.id, UnitKind.BASE, 2, "animal words")  # head 1, i=0
        explanations.create_explanation(
            s, kron.id, UnitKind.EXTENSION, 5, "plural endings"
        )  # head 1, j=1
        explanations.create_explanation(
            s, bare.id, UnitKind.LATENT, 3, "an explained latent, no harvest"
        )
        s.commit()
        return Seeded(kron.slug, topk.slug, bare.slug, 5, "zebra")


@pytest.fixture(scope="session")
def api_db(db_url: str) -> Iterator[tuple[str, Seeded]]:
    engine = make_engine(db_url)
    upgrade(engine)
    seeded = _seed(sessionmaker(bind=engine, expire_on_commit=False))
    engine.dispose()
    yield db_url, seeded


@pytest.fixture
def seeded(api_db: tuple[str, Seeded]) -> Seeded:
    return api_db[1]


@pytest.fixture
def db_factory(api_db: tuple[str, Seeded]) -> Iterator[sessionmaker[Session]]:
    engine: Engine = make_engine(api_db[0])
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


@pytest.fixture
def make_settings(
    api_db: tuple[str, Seeded], tiny_models_dir: Path, tmp_path: Path
) -> Callable[..., Settings]:
    def _make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "environment": "test",
            "data_dir": tmp_path / "data",
            "database_url": api_db[0],
            "models_dir": tiny_models_dir,
            "device": "cpu",
            "run_jobs_in_process": False,
            "job_poll_seconds": 0.1,
            "job_heartbeat_seconds": 0.2,
        }
        values.update(overrides)
        return Settings(**values)

    return _make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@dataclass
class Keys:
    all: str
    upload: str
    delete: str
    jobs: str
    explanations: str
    revoked: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.all}"}


@pytest.fixture(scope="session")
def keys_(api_db: tuple[str, Seeded]) -> Keys:
    engine = make_engine(api_db[0])
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as s:
        plain: dict[str, str] = {}
        _, plain["all"] = keys.create_key(s, "tester", ["upload", "delete", "jobs", "explanations"])
        for scope in ("upload", "delete", "jobs", "explanations"):
            _, plain[scope] = keys.create_key(s, f"only-{scope}", [scope])
        revoked, plain["revoked"] = keys.create_key(s, "old", ["upload"])
        keys.revoke_key(s, revoked.id)
        s.commit()
    engine.dispose()
    return Keys(**plain)


@pytest.fixture
def auth(keys_: Keys) -> dict[str, str]:
    return keys_.auth()


# -- checkpoints ----------------------------------------------------------------------------
def make_checkpoint(
    folder: Path,
    *,
    seed: int = 0,
    architecture: str = "kronsae",
    model_name: str | None = TINY_MODEL,
    hook_name: str | None = TINY_HOOK,
    d_in: int = TINY_D,
) -> Path:
    """A small random native checkpoint (a different seed gives a different hash)."""
    metadata: dict[str, Any] = {}
    if model_name:
        metadata["model_name"] = model_name
    if hook_name:
        metadata["hook_name"] = hook_name
    if architecture == "kronsae":
        cfg = SAEConfig(
            architecture="kronsae", d_in=d_in, d_sae=16, k=2, h=2, m=2, n=4, metadata=metadata
        )
    else:
        cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=16, k=2, metadata=metadata)
    sae = build(cfg)
    generator = torch.Generator().manual_seed(seed)
    if hasattr(sae, "init_weights"):
        sae.init_weights(generator)
    with torch.no_grad():
        for p in sae.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return save(sae, folder)


def folder_files(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """multipart ``files`` parts for the checkpoint files of ``folder``."""
    return [
        ("files", (f"{folder.name}/{p.name}", p.read_bytes(), "application/octet-stream"))
        for p in sorted(folder.iterdir())
        if p.name in CHECKPOINT_NAMES
    ]


def archive_bytes(folder: Path, kind: str) -> bytes:
    buf = io.BytesIO()
    names = [p for p in sorted(folder.iterdir()) if p.name in CHECKPOINT_NAMES]
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for p in names:
                zf.write(p, f"{folder.name}/{p.name}")
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for p in names:
                tf.add(p, arcname=f"{folder.name}/{p.name}")
    return buf.getvalue()


def upload(
    client: TestClient,
    folder: Path,
    headers: dict[str, str],
    **fields: Any,
) -> Any:
    return client.post(
        "/api/v1/saes",
        files=folder_files(folder),
        data={k: str(v) for k, v in fields.items()},
        headers=headers,
    )


def stored_state(factory: sessionmaker[Session], data_dir: Path) -> tuple[int, list[str]]:
    """(number of SAE rows, files under data_dir/saes): what 'nothing stored' compares."""
    import sqlalchemy as sa

    with factory() as s:
        count = s.scalar(sa.select(sa.func.count()).select_from(Sae)) or 0
    saes_dir = data_dir / "saes"
    files = (
        sorted(str(p.relative_to(data_dir)) for p in saes_dir.rglob("*"))
        if saes_dir.exists()
        else []
    )
    return count, files
