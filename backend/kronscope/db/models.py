"""The relational schema (one for SQLite and PostgreSQL; ``alembic/versions`` creates it).

Storage decisions (see ARCHITECTURE.md, "Storage decisions"):

- **Units.** Latents and KronSAE parents share the example and statistics tables, keyed by
  ``(unit_kind, unit_index)``: kind 0 a latent (index ``0..F-1``), 1 a base parent (flat
  index ``g*m + i``), 2 an extension parent (flat index ``g*n + j``).
- **Contexts** are stored once per harvest and shared by every example drawn from them.
  A context keeps only its token ids (``int32`` little endian, 4 bytes a token); the
  display string of each id is stored once per harvest in ``token`` (a few tens of
  thousands of short rows). A JSON list of strings per context would cost ~7 bytes a
  token (quotes, comma, text) and repeat the same strings in every context: with one
  context per example it would be the largest thing in the database. Pages render from
  ids + ``token`` without loading a tokenizer.
- **Examples** hold their per-token values as one ``float16`` little-endian blob (2 bytes a
  token), not a row per token and not a ``float[]``. With contexts of 128 tokens an
  example row is about 300 bytes and its context about 550.
- **Visibility.** A harvest writes everything under its own id while it is not the SAE's
  ``active_harvest_id``; pages read only through that pointer, and ``mark_complete`` flips
  it in one UPDATE, so a harvest appears all at once or not at all.
- **Foreign keys on bulk rows** are checked per row, which is half the cost of a COPY:
  an example has exactly one (``context_id``, ON DELETE CASCADE); deleting a harvest
  cascades harvest -> contexts -> examples.
- Histograms: counts as ``int64`` little endian (exact for any corpus), edges as JSON.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .base import Base, BigIntPK, NullableJSON, TimestampMixin, UTCDateTime, utcnow


class UnitKind(enum.IntEnum):
    LATENT = 0
    BASE = 1
    EXTENSION = 2


class ExampleKind(enum.IntEnum):
    TOP = 0
    SAMPLE = 1


class HarvestStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(enum.StrEnum):
    HARVEST = "harvest"
    EXPLAIN = "explain"
    IMPORT = "import"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _in(column: str, values: type[enum.Enum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Sae(TimestampMixin, Base):
    """One uploaded checkpoint with its subject model and hook."""

    __tablename__ = "sae"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(sa.String(128), unique=True)
    architecture: Mapped[str] = mapped_column(sa.String(32))
    d_in: Mapped[int] = mapped_column(sa.Integer)
    d_sae: Mapped[int] = mapped_column(sa.Integer)
    k: Mapped[int | None] = mapped_column(sa.Integer)
    h: Mapped[int | None] = mapped_column(sa.Integer)
    m: Mapped[int | None] = mapped_column(sa.Integer)
    n: Mapped[int | None] = mapped_column(sa.Integer)
    composition: Mapped[str | None] = mapped_column(sa.String(32))
    dtype: Mapped[str] = mapped_column(sa.String(16), default="float32")
    model_name: Mapped[str | None] = mapped_column(sa.String(512))
    hook_name: Mapped[str | None] = mapped_column(sa.String(512))
    cfg: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    """The full cfg.json as uploaded."""
    metrics: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    provenance: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    """Source format, original file names, who uploaded it."""
    file_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    """sha256 of the checkpoint's weights: the same checkpoint uploaded twice is recognised."""
    storage_path: Mapped[str] = mapped_column(sa.String(1024))
    """The checkpoint folder, relative to ``data_dir``."""
    active_harvest_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("harvest.id", use_alter=True, ondelete="SET NULL")
    )
    """The complete harvest pages show; flipped in one UPDATE when a harvest completes."""

    harvests: Mapped[list[Harvest]] = relationship(
        back_populates="sae",
        foreign_keys="Harvest.sae_id",
        lazy="raise",
        passive_deletes=True,
    )

    @property
    def is_kronsae(self) -> bool:
        return self.architecture == "kronsae" and bool(self.h and self.m and self.n)


class Harvest(TimestampMixin, Base):
    """One pass of one SAE over one corpus."""

    __tablename__ = "harvest"
    __table_args__ = (sa.CheckConstraint(_in("status", HarvestStatus), name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sae_id: Mapped[int] = mapped_column(sa.ForeignKey("sae.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(sa.String(16), default=HarvestStatus.PENDING.value)
    corpus_name: Mapped[str] = mapped_column(sa.String(512))
    corpus_description: Mapped[str | None] = mapped_column(sa.Text)
    corpus_hash: Mapped[str | None] = mapped_column(sa.String(64))
    n_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    """Tokens requested."""
    tokens_seen: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    ctx_len: Mapped[int] = mapped_column(sa.Integer)
    params: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    """Examples per latent, sample size, seed, histogram bins, ..."""
    error: Mapped[str | None] = mapped_column(sa.Text)
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    """Resume state written by the harvester (progress, RNG state, partial aggregates...)."""
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    sae: Mapped[Sae] = relationship(back_populates="harvests", foreign_keys=[sae_id], lazy="raise")


class Token(Base):
    """Display string of one token id, stored once per harvest."""

    __tablename__ = "token"

    harvest_id: Mapped[int] = mapped_column(
        sa.ForeignKey("harvest.id", ondelete="CASCADE"), primary_key=True
    )
    token_id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(sa.Text)


class Context(Base):
    """One window of corpus tokens, shared by all examples drawn from it."""

    __tablename__ = "context"
    __table_args__ = (sa.UniqueConstraint("harvest_id", "position"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    harvest_id: Mapped[int] = mapped_column(sa.ForeignKey("harvest.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(sa.BigInteger)
    """Where the window starts in the corpus (in tokens, or a window number: the harvester's choice)."""
    token_ids: Mapped[bytes] = mapped_column(sa.LargeBinary)
    """int32 little endian, one per token (``codec.pack_i32``)."""


class Example(Base):
    """A (context, unit) pair with the unit's value at every token of the context."""

    __tablename__ = "example"
    __table_args__ = (
        sa.Index(
            "ix_example_unit",
            "harvest_id",
            "unit_kind",
            "unit_index",
            "kind",
            "rank",
            unique=True,
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    harvest_id: Mapped[int] = mapped_column(sa.Integer)
    """The context's harvest, repeated for the unit index; no foreign key of its own: one
    check per row is enough, and the cascade comes through ``context_id``."""
    unit_kind: Mapped[int] = mapped_column(sa.SmallInteger)
    unit_index: Mapped[int] = mapped_column(sa.Integer)
    kind: Mapped[int] = mapped_column(sa.SmallInteger)
    """0 top-activating, 1 reservoir sample."""
    rank: Mapped[int] = mapped_column(sa.Integer)
    context_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.ForeignKey("context.id", ondelete="CASCADE"),
        index=True,  # deleting a context (harvest cascade) finds its examples by this
    )
    max_value: Mapped[float] = mapped_column(sa.REAL)
    max_pos: Mapped[int] = mapped_column(sa.SmallInteger)
    values: Mapped[bytes] = mapped_column(sa.LargeBinary)
    """float16 little endian, one per token of the context (``codec.pack_f16``)."""
    sample_pos: Mapped[int | None] = mapped_column(sa.SmallInteger)
    """Samples only: the token position that was sampled."""
    sample_value: Mapped[float | None] = mapped_column(sa.REAL)
    """Samples only: the unit's value there (what activation intervals filter on)."""

    context: Mapped[Context] = relationship(lazy="raise")


class UnitStats(Base):
    """Aggregate statistics of one unit in one harvest."""

    __tablename__ = "unit_stats"
    harvest_id: Mapped[int] = mapped_column(
        sa.ForeignKey("harvest.id", ondelete="CASCADE"), primary_key=True
    )
    unit_kind: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True, autoincrement=False)
    unit_index: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    n_active: Mapped[int] = mapped_column(sa.BigInteger)
    """Tokens where the value is > 0."""
    frequency: Mapped[float] = mapped_column(sa.Double)
    """n_active / tokens seen."""
    mean_value: Mapped[float | None] = mapped_column(sa.Double)
    """Mean over active tokens."""
    max_value: Mapped[float] = mapped_column(sa.Double)
    histogram: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    """Counts per bin, int64 little endian (``codec.pack_i64``)."""
    histogram_edges: Mapped[list[float] | None] = mapped_column(NullableJSON)
    both_parents_active: Mapped[int | None] = mapped_column(sa.BigInteger)
    """KronSAE latents: tokens where both parents are > 0."""
    kept_count: Mapped[int | None] = mapped_column(sa.BigInteger)
    """KronSAE latents: of those, tokens where TopK kept the latent."""
    logit_effects: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    """Causal LMs: ``{"top": [[token, value], ...], "bottom": [...]}``."""
    neighbours: Mapped[list[Any] | None] = mapped_column(NullableJSON)
    """Top 10 ``[index, cosine]`` by decoder direction."""


# The latent list's sort indexes: one per key and direction, ties by index ascending either
# way, so that a page is an index-only walk to its offset (``stats.list_units``).
for _key in (UnitStats.frequency, UnitStats.max_value):
    for _suffix, _order in (("asc", _key), ("desc", _key.desc())):
        sa.Index(
            f"ix_unit_stats_{_key.key}_{_suffix}",
            UnitStats.harvest_id,
            UnitStats.unit_kind,
            _order,
            UnitStats.unit_index,
        )


class Explanation(TimestampMixin, Base):
    """Text describing a latent or parent. Belongs to the SAE, so it survives re-harvests."""

    __tablename__ = "explanation"
    __table_args__ = (
        sa.Index("ix_explanation_unit", "sae_id", "unit_kind", "unit_index"),
        sa.Index("ix_explanation_seq", "sae_id", "seq"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sae_id: Mapped[int] = mapped_column(sa.ForeignKey("sae.id", ondelete="CASCADE"))
    unit_kind: Mapped[int] = mapped_column(sa.SmallInteger)
    unit_index: Mapped[int] = mapped_column(sa.Integer)
    text: Mapped[str] = mapped_column(sa.Text)
    source: Mapped[str] = mapped_column(sa.String(128))
    """``human``, ``heuristic`` or ``llm:<model>``."""
    author: Mapped[str | None] = mapped_column(sa.String(256))
    score: Mapped[float | None] = mapped_column(sa.Double)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    seq: Mapped[int] = mapped_column(
        sa.BigInteger, server_default="0", server_onupdate=sa.FetchedValue()
    )
    """The change number the database gives every insert and update (alembic 0003): larger
    than any earlier one of the SAE, in commit order. What page caches follow."""

    revisions: Mapped[list[ExplanationRevision]] = relationship(
        back_populates="explanation",
        lazy="raise",
        passive_deletes=True,
        order_by="ExplanationRevision.id",
    )


class ExplanationRevision(Base):
    """Every version of an explanation's text, the first one included."""

    __tablename__ = "explanation_revision"

    id: Mapped[int] = mapped_column(primary_key=True)
    explanation_id: Mapped[int] = mapped_column(
        sa.ForeignKey("explanation.id", ondelete="CASCADE"), index=True
    )
    text: Mapped[str] = mapped_column(sa.Text)
    author: Mapped[str | None] = mapped_column(sa.String(256))
    source: Mapped[str] = mapped_column(sa.String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    explanation: Mapped[Explanation] = relationship(back_populates="revisions", lazy="raise")


class Job(TimestampMixin, Base):
    """Long work (harvest, explain, import) run by a worker outside the request."""

    __tablename__ = "job"
    __table_args__ = (
        sa.CheckConstraint(_in("status", JobStatus), name="status"),
        sa.CheckConstraint(_in("kind", JobKind), name="kind"),
        sa.Index("ix_job_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16), default=JobStatus.QUEUED.value)
    sae_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("sae.id", ondelete="SET NULL"), index=True
    )
    harvest_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("harvest.id", ondelete="SET NULL"), index=True
    )
    params: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    progress_done: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    progress_total: Mapped[int | None] = mapped_column(sa.BigInteger)
    rate: Mapped[float | None] = mapped_column(sa.Double)
    """Units of progress per second."""
    eta_s: Mapped[float | None] = mapped_column(sa.Double)
    message: Mapped[str | None] = mapped_column(sa.Text)
    error: Mapped[str | None] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    locked_by: Mapped[str | None] = mapped_column(sa.String(256))
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ApiKey(Base):
    """A write key. Only its sha256 is stored; the plain key is shown once at creation."""

    __tablename__ = "api_key"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(256))
    prefix: Mapped[str] = mapped_column(sa.String(16), index=True)
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
