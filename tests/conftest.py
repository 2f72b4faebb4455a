"""Shared fixtures: tiny random subject models (built offline, once per test session).

``tiny_models_dir`` is a folder usable as ``KRONSCOPE_MODELS_DIR`` with the sub-folders
``tiny-gpt2``, ``tiny-llama`` and ``tiny-bert``; the ``tiny_*_dir`` fixtures point at one
of them. See ``helpers/tiny_models.py`` to build more (other seeds, other places).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tiny_models import make_tiny_models_dir


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_models_dir(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-gpt2"


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-bert"
