"""Harvest fixtures: the tiny GPT-2, a few dozen short contexts, tiny SAEs of every kind,
and the shared database fixtures (``helpers.db``: SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harvest_ref import TINY_MODEL

from helpers.db import *  # noqa: F403
from kronscope.config import Settings
from kronscope.lm import Contexts, SubjectModel, load_corpus, load_model, make_contexts

CTX_LEN = 16
N_CONTEXTS = 40

CORPUS = "\n\n".join(
    [
        "The quick brown fox jumps over the lazy dog.",
        "A sparse autoencoder reads the residual stream of a language model.",
        "KronSAE composes base and extension pre-latents with mAND.",
        "def add(a, b):\n    return a + b",
        "Python lists, tuples and dictionaries are built-in types.",
        "Numbers like 3.14, 42 and 1e-5 appear in text too!",
        "Tokenizers split words into pieces; some pieces are rare.",
        "the cat sat on the mat and the dog sat on the log",
    ]
    * 12
)


@pytest.fixture(scope="session")
def harvest_settings(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        models_dir=tiny_models_dir,
        data_dir=tmp_path_factory.mktemp("harvest-data"),
        device="cpu",
        allow_hub_models=False,
    )


@pytest.fixture(scope="session")
def tiny_lm(harvest_settings: Settings) -> SubjectModel:
    return load_model(TINY_MODEL, settings=harvest_settings)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="session")
def contexts(tiny_lm: SubjectModel, corpus_file: Path) -> Contexts:
    """[40, 16] windows: BOS first, EOS separators inside (both special)."""
    ctx = make_contexts(load_corpus(corpus_file), tiny_lm, CTX_LEN, seed=0, max_contexts=N_CONTEXTS)
    assert len(ctx) == N_CONTEXTS
    return ctx
