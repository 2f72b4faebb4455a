"""One settings object for the whole application, read from ``KRONSCOPE_*`` variables.

The embedded default needs no configuration: data (the SQLite database, uploads, model
caches) lives under ``KRONSCOPE_DATA_DIR`` (``./data`` unless set).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KRONSCOPE_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    """Outside development, unsafe defaults (open writes, a generated secret) are refused."""

    data_dir: Path = Field(default_factory=lambda: Path("data").resolve())
    """Where the embedded database, uploaded checkpoints and model caches live."""

    database_url: str | None = None
    """SQLAlchemy URL; defaults to a SQLite file in ``data_dir``."""

    models_dir: Path | None = None
    """Folder whose sub-folders are subject models, addressed by their folder name."""

    allow_hub_models: bool = False
    """Let model names that are not local resolve as Hugging Face hub ids (needs network)."""

    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda"):
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'kronscope.db'}"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def resolve_device(name: str | None = None) -> str:
    """Turn a device setting into a torch device string; ``auto`` picks CUDA when present."""
    import torch

    name = (name or get_settings().device).lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but no CUDA device is available")
    return name
