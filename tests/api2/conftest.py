"""Fixtures of the live-inference, explanation and export tests: the real app on SQLite and
PostgreSQL (``helpers.db``: the scratch database, emptied before and after each test), a
tiny random subject model and tiny SAEs registered through the SAE registry, and API keys.

``api`` (function scope) is a started ``TestClient`` with two SAEs registered:
``tiny-kron`` (KronSAE h=8, m=2, n=4, F=64, k=8 on ``tiny-gpt2`` at ``transformer.h.1``) and
``tiny-topk`` (TopK, F=48, k=6, same model and hook); ``api.key`` has every scope.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from helpers.db import *  # noqa: F403
from helpers.db import write_fake_harvest
from kronscope.app import create_app
from kronscope.config import Settings
from kronscope.db import make_sessionmaker
from kronscope.db.repositories import saes as sae_repo
from kronscope.sae import SAEConfig, build
from kronscope.sae.checkpoint import save
from kronscope.services import keys as key_service
from kronscope.services import sae_registry
from kronscope.services.jobs import JobRunner

MODEL = "tiny-gpt2"
HOOK = "transformer.h.1"
D_IN = 32


def make_checkpoint(
    folder: Path,
    *,
    architecture: str = "kronsae",
    seed: int = 0,
    model: str = MODEL,
    hook: str = HOOK,
    **dims: Any,
) -> Path:
    """A seeded random SAE saved natively in ``folder``."""
    if architecture == "kronsae":
        h, m, n = dims.get("h", 8), dims.get("m", 2), dims.get("n", 4)
        cfg = SAEConfig(
            architecture="kronsae", d_in=D_IN, d_sae=h * m * n, k=dims.get("k", 8), h=h, m=m, n=n,
            metadata={"model_name": model, "hook_name": hook},
        )  # fmt: skip
    else:
        cfg = SAEConfig(
            architecture=architecture, d_in=D_IN, d_sae=dims.get("d_sae", 48),
            k=dims.get("k", 6) if architecture == "topk" else None,
            apply_b_dec_to_input=False, metadata={"model_name": model, "hook_name": hook},
        )  # fmt: skip
    sae = build(cfg)
    g = torch.Generator().manual_seed(seed)
    sae.init_weights(g)
    with torch.no_grad():  # larger encoder weights: plenty of active latents on tiny models
        sae.W_enc.mul_(8.0)
        if architecture == "jumprelu":
            sae.threshold.fill_(0.05)  # type: ignore[operator]
    return save(sae, folder)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "tiny-kron": make_checkpoint(root / "kron", seed=1),
        "tiny-topk": make_checkpoint(root / "topk", architecture="topk", seed=2),
        "tiny-kron-2": make_checkpoint(root / "kron2", seed=3),
        "tiny-jump": make_checkpoint(root / "jump", architecture="jumprelu", seed=4, d_sae=40),
    }


@dataclass
class Api:
    client: TestClient
    app: FastAPI
    settings: Settings
    sessions: sessionmaker[Session]
    key: str
    checkpoints: dict[str, Path]
    engine_db: Engine
    headers: dict[str, str] = field(default_factory=dict)

    def register(self, slug: str, source: str | None = None, **opts: Any) -> None:
        with self.sessions() as s:
            sae_registry.register_checkpoint(
                s,
                self.settings,
                self.checkpoints[source or slug],
                sae_registry.UploadOptions(slug=slug, uploader="tests", **opts),
            )
            s.commit()

    def harvest(self, slug: str, **opts: Any) -> int:
        """A small fake harvest (``helpers.db.write_fake_harvest``), made active."""
        with self.sessions() as s:
            row = sae_repo.get_sae_by_slug(s, slug)
            assert row is not None
            harvest_id = write_fake_harvest(s, row, **opts)
            s.commit()
        return harvest_id

    def wait_job(self, job_id: str) -> dict[str, Any]:
        """Run queued jobs with the real runner (in this thread), then read ``job_id``.

        The app's in-process runner is off in these tests: on SQLite its polling takes the
        write lock many times a second, and a request that reads and then writes (every
        keyed request touches its key) fails with "database is locked" when the two meet.
        """
        runner = JobRunner(make_sessionmaker(self.engine_db, begin_immediate=True), self.settings)
        while runner.run_once():
            pass
        job = self.client.get(f"/api/v1/jobs/{job_id}").json()
        assert job["status"] in ("complete", "failed", "cancelled"), job
        return job  # type: ignore[no-any-return]

    def new_key(self, name: str, scopes: list[str]) -> str:
        with self.sessions() as s:
            _, plain = key_service.create_key(s, name, scopes)
            s.commit()
        return plain

    @property
    def engine(self) -> Any:
        return getattr(self.app.state, "inference_engine", None)


def api_settings(db_url: str, data_dir: Path, models_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": db_url,
        "data_dir": data_dir,
        "models_dir": models_dir,
        "device": "cpu",
        "run_jobs_in_process": False,  # see Api.wait_job
        "job_heartbeat_seconds": 0.5,
        "inference_batch_wait_ms": 20.0,
        "llm_max_retries": 0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change the app's settings."""
    return {}


@pytest.fixture
def make_api(
    db_scratch_engine: Engine,
    db_committed: sessionmaker[Session],
    tiny_models_dir: Path,
    checkpoints: dict[str, Path],
    tmp_path: Path,
) -> Iterator[Callable[..., Api]]:
    made: list[Api] = []
    stack: list[TestClient] = []

    def _make(register: tuple[str, ...] = ("tiny-kron", "tiny-topk"), **overrides: Any) -> Api:
        data_dir = tmp_path / f"data-{secrets.token_hex(3)}"
        url = db_scratch_engine.url.render_as_string(hide_password=False)
        settings = api_settings(url, data_dir, tiny_models_dir, **overrides)
        app = create_app(settings)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        stack.append(client)
        # BEGIN IMMEDIATE on SQLite: registering reads then writes while the app's job
        # runner may commit in between.
        sessions = make_sessionmaker(db_scratch_engine, begin_immediate=True)
        api = Api(client, app, settings, sessions, "", checkpoints, db_scratch_engine)
        api.key = api.new_key("alice", ["explanations", "jobs", "upload", "delete"])
        api.headers = {"Authorization": f"Bearer {api.key}"}
        for slug in register:
            api.register(slug)
        made.append(api)
        return api

    yield _make
    for api in made:
        if api.engine is not None:
            api.engine.close()
    for client in stack:
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Callable[..., Api], settings_overrides: dict[str, Any]) -> Api:
    return make_api(**settings_overrides)
