"""Response (and request) models of the JSON API: the OpenAPI schema describes exactly these."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Model(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(Model, Generic[T]):
    """A page of a list: ``items`` and the size of the whole list."""

    items: list[T]
    total: int = Field(ge=0)
    limit: int = Field(ge=0)
    offset: int = Field(ge=0)


# -- health -----------------------------------------------------------------------------------
class DatabaseHealth(Model):
    reachable: bool
    dialect: str
    revision: str | None = None
    error: str | None = None


class JobRunnerHealth(Model):
    in_process: bool = Field(description="Jobs run in a thread of this process.")
    alive: bool


class Health(Model):
    status: Literal["ok", "degraded"]
    live: bool = True
    ready: bool = Field(description="The database is reachable.")
    version: str
    device: str
    database: DatabaseHealth
    jobs: JobRunnerHealth


# -- SAEs and harvests -------------------------------------------------------------------------
HarvestStatusName = Literal["none", "pending", "running", "complete", "failed", "cancelled"]


class HarvestOut(Model):
    id: int
    status: str
    corpus: str
    corpus_description: str | None = None
    n_tokens: int
    tokens_seen: int
    ctx_len: int
    params: dict[str, Any]
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    active: bool = Field(description="Pages show this harvest.")


class SAEOut(Model):
    slug: str
    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None
    h: int | None = None
    m: int | None = None
    n: int | None = None
    composition: str | None = None
    dtype: str
    model: str | None = Field(default=None, description="Subject model name.")
    hook: str | None = Field(default=None, description="Where activations are read.")
    metrics: dict[str, Any]
    source_format: str | None = None
    uploaded_by: str | None = None
    file_hash: str
    created_at: datetime
    harvest_status: HarvestStatusName = Field(
        description="Status of the newest harvest, or none when never harvested."
    )
    active_harvest: HarvestOut | None = Field(default=None, description="The harvest pages show.")


class ProgressOut(Model):
    done: int
    total: int | None = None
    fraction: float | None = Field(default=None, ge=0, le=1)


class JobOut(Model):
    id: str
    kind: str
    status: str
    sae: str | None = Field(default=None, description="Slug of the SAE it works on.")
    harvest_id: int | None = None
    params: dict[str, Any]
    progress: ProgressOut
    rate: float | None = Field(default=None, description="Units of progress per second.")
    eta_seconds: float | None = None
    message: str | None = None
    error: str | None = None
    attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None


class SAEUploaded(SAEOut):
    warnings: list[str] = Field(
        default_factory=list, description="Things worth knowing about the file."
    )
    job: JobOut | None = Field(default=None, description="The harvest job started with the upload.")


class HarvestRequest(Model):
    """Start a harvest: one pass of the subject model and the SAE over a corpus."""

    model_config = ConfigDict(extra="forbid")

    corpus: str = Field(
        default="builtin",
        min_length=1,
        max_length=512,
        description="'builtin' (the Python docs) or a corpus name the server knows.",
    )
    tokens: int = Field(default=200_000, ge=1, le=10**11, description="Tokens to read.")
    ctx_len: int = Field(default=64, ge=2, le=8192, description="Tokens per context.")
    examples_per_latent: int = Field(default=20, ge=1, le=200)
    samples_per_latent: int = Field(default=20, ge=1, le=500)
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class HarvestStarted(Model):
    harvest: HarvestOut | None = None
    job: JobOut


# -- explanations and stats --------------------------------------------------------------------
class ExplanationOut(Model):
    id: int
    text: str
    source: str
    author: str | None = None
    score: float | None = None
    created_at: datetime
    updated_at: datetime


class StatsOut(Model):
    n_active: int = Field(description="Tokens where the unit is > 0.")
    density: float = Field(description="Fraction of tokens where the unit is > 0.")
    mean_activation: float | None = Field(default=None, description="Mean over active tokens.")
    max_activation: float
    both_parents_active: int | None = Field(
        default=None, description="KronSAE: tokens where both parents are > 0."
    )
    kept_count: int | None = Field(default=None, description="KronSAE: of those, tokens TopK kept.")


class HistogramOut(Model):
    edges: list[float] = Field(description="Bin edges (one more than counts).")
    counts: list[int]


class TokenValue(Model):
    token: str
    value: float


class LogitEffectsOut(Model):
    top: list[TokenValue] = Field(
        description="Tokens this latent's decoder direction promotes most."
    )
    bottom: list[TokenValue] = Field(description="Tokens it suppresses most.")


class ExampleOut(Model):
    rank: int
    context_id: int
    position: int = Field(description="Where the context starts in the corpus.")
    tokens: list[str]
    values: list[float] = Field(description="The unit's value at every token.")
    max_value: float
    max_pos: int
    sample_pos: int | None = None
    sample_value: float | None = None


class IntervalOut(Model):
    index: int
    low: float
    high: float
    examples: list[ExampleOut]


class LatentBrief(Model):
    """A latent in lists, grids and sibling sets."""

    index: int
    head: int | None = None
    base: int | None = None
    extension: int | None = None
    density: float | None = None
    max_activation: float | None = None
    mean_activation: float | None = None
    n_active: int | None = None
    explanation: str | None = Field(default=None, description="The best explanation's text.")


class LatentPage(Page[LatentBrief]):
    harvest_status: HarvestStatusName


class NeighbourOut(Model):
    index: int
    cosine: float
    density: float | None = None
    explanation: str | None = None


class ParentBrief(Model):
    kind: Literal["base", "extension"]
    head: int
    index: int = Field(description="Index within the head (i for base, j for extension).")
    flat_index: int = Field(description="g*m + i (base) or g*n + j (extension).")
    stats: StatsOut | None = None
    explanations: list[ExplanationOut]


class CompositionOut(Model):
    head: int
    base: int
    extension: int
    base_parent: ParentBrief
    extension_parent: ParentBrief
    row_siblings: list[LatentBrief] = Field(description="Latents sharing the base parent.")
    column_siblings: list[LatentBrief] = Field(description="Latents sharing the extension parent.")


class UnitExamples(Model):
    harvest_status: HarvestStatusName
    harvest_id: int | None = None
    stats: StatsOut | None = None
    histogram: HistogramOut | None = None
    explanations: list[ExplanationOut]
    top_examples: list[ExampleOut]
    sampled_examples: list[IntervalOut]
    interval_mode: Literal["width", "quantile"]


class LatentDetail(UnitExamples):
    sae: str
    index: int
    architecture: str
    composition: CompositionOut | None = Field(description="null for non-KronSAE SAEs.")
    logit_effects: LogitEffectsOut | None = None
    neighbours: list[NeighbourOut]


class ParentDetail(UnitExamples):
    sae: str
    kind: Literal["base", "extension"]
    head: int
    index: int
    flat_index: int
    children: list[LatentBrief]


class GridAxis(Model):
    index: int
    flat_index: int
    label: str | None = Field(default=None, description="The parent's best explanation.")
    density: float | None = None


class HeadGrid(Model):
    sae: str
    head: int
    m: int
    n: int
    harvest_status: HarvestStatusName
    rows: list[GridAxis] = Field(description="Base parents (i = 0..m-1).")
    columns: list[GridAxis] = Field(description="Extension parents (j = 0..n-1).")
    cells: list[list[LatentBrief]] = Field(
        description="m rows of n latents; cell [i][j] is latent (head, i, j)."
    )
