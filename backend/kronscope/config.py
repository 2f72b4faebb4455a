"""One settings object for the whole application, read from ``KRONSCOPE_*`` variables.

The embedded default needs no configuration: data (the SQLite database, uploads, model
caches) lives under ``KRONSCOPE_DATA_DIR`` (``./data`` unless set).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
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

    db_pool_size: int = Field(default=10, ge=1, le=256)
    """Database connections the web process keeps open. Requests use at most this many at
    once (more wait their turn); as many again may open for jobs and exports."""

    page_threads: int = Field(default=2, ge=1, le=64)
    """Threads that read and serialise feature pages. The work is mostly Python, so threads
    beyond the cores only take turns holding the interpreter (and each turn costs): a few
    threads serve a page load faster than many. Unset, ``kronscope serve --workers N`` gives
    each worker cores / N of them (at most 2)."""

    # -- API and jobs ------------------------------------------------------------------
    require_key_for_reads: bool = False
    """Reads are public by default; set true to require an API key (any scope) for them."""

    secret_key: str | None = None
    """Mixed into API key hashes (HMAC). Required outside development."""

    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    """Largest checkpoint upload (all parts together); larger ones get 413 as soon as seen."""

    max_json_bytes: int = Field(default=1024**2, gt=0)
    """Largest JSON request body."""

    run_jobs_in_process: bool = True
    """Run jobs in a thread of the web process (the embedded default). Turn off when
    ``kronscope worker`` processes run the jobs (PostgreSQL deployments)."""

    job_poll_seconds: float = Field(default=1.0, gt=0)
    """How often an idle worker looks for a queued job."""

    job_heartbeat_seconds: float = Field(default=5.0, gt=0)
    """How often a running job records that its worker is alive."""

    job_stale_seconds: float = Field(default=60.0, gt=0)
    """A running job whose heartbeat is older than this belongs to a dead worker."""

    job_max_attempts: int = Field(default=3, ge=1)
    """A job requeued this many times is marked failed instead."""

    # -- live inference, explanations, export (issue 6; services/inference.py, ...) ------
    inference_max_batch: int = Field(default=16, ge=1, le=256)
    """Requests the inference worker joins into one padded batch at most."""

    inference_batch_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    """How long the worker waits for more requests to join a batch it has started."""

    inference_batch_max_wait_ms: float = Field(default=250.0, ge=0, le=5000)
    """While admitted requests are still being tokenised, the worker waits for them to join
    the batch (they are known to be coming) for half the recent batch compute time, at most
    this long."""

    inference_queue_size: int = Field(default=64, ge=1)
    """Requests waiting for the inference worker; beyond this, 503 with Retry-After."""

    inference_max_text_bytes: int = Field(default=32_768, gt=0)
    """Largest text (UTF-8 bytes, all texts of a request together): 413 beyond."""

    inference_max_tokens: int = Field(default=512, ge=2)
    """Most tokens per text (further capped by the model's context): 422 beyond."""

    inference_max_texts: int = Field(default=16, ge=1)
    """Most texts in one request."""

    inference_max_models: int = Field(default=2, ge=1)
    """Subject models the inference engine keeps loaded (LRU)."""

    inference_max_saes: int = Field(default=8, ge=1)
    """SAEs the inference engine keeps loaded (LRU)."""

    inference_timeout_s: float = Field(default=120.0, gt=0)
    """A request waiting longer than this for its result gets 503."""

    llm_url: str | None = None
    """OpenAI-compatible endpoint for generated explanations, e.g. ``http://127.0.0.1:8000/v1``
    (``/chat/completions`` is appended unless the URL already ends with it). Unset: no LLM."""

    llm_model: str | None = None
    """Model name sent to the endpoint; explanations record ``llm:<model>`` as their source."""

    llm_api_key: str | None = None
    """Sent as ``Authorization: Bearer <key>`` when set."""

    llm_timeout_s: float = Field(default=30.0, gt=0)
    """Per-request timeout of the LLM endpoint."""

    llm_max_retries: int = Field(default=1, ge=0, le=10)
    """Retries of a timed-out or 5xx LLM request before the job fails."""

    explain_examples: int = Field(default=10, ge=1, le=100)
    """Top examples per unit an explainer reads (plus as many sampled ones)."""
    # -- end of issue 6 settings ----------------------------------------------------------

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda"):
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.environment == "production" and not self.secret_key:
            raise ValueError("KRONSCOPE_SECRET_KEY must be set when environment is production")
        return self

    @property
    def resolved_secret_key(self) -> str:
        """The key hashing secret; development and test fall back to a fixed, public one."""
        return self.secret_key or "kronscope-development-secret"

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
