"""Fixtures of the subject-model tests: settings pointing at the tiny models, loaded models."""

from __future__ import annotations

from pathlib import Path

import pytest

from kronscope.config import Settings
from kronscope.lm import SubjectModel, load_model


@pytest.fixture(scope="session")
def lm_settings(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings with the tiny models as models_dir and a fresh data dir for the session."""
    return Settings(
        models_dir=tiny_models_dir,
        data_dir=tmp_path_factory.mktemp("kronscope-data"),
        device="cpu",
        allow_hub_models=False,
    )


@pytest.fixture(scope="session")
def tiny_gpt2(lm_settings: Settings) -> SubjectModel:
    return load_model("tiny-gpt2", settings=lm_settings)


@pytest.fixture(scope="session")
def tiny_llama(lm_settings: Settings) -> SubjectModel:
    return load_model("tiny-llama", settings=lm_settings)


@pytest.fixture(scope="session")
def tiny_bert(lm_settings: Settings) -> SubjectModel:
    return load_model("tiny-bert", settings=lm_settings)


@pytest.fixture(params=["gpt2", "llama", "bert"])
def tiny(request: pytest.FixtureRequest) -> SubjectModel:
    """Each tiny model in turn."""
    return request.getfixturevalue(f"tiny_{request.param}")
