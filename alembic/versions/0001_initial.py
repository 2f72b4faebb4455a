"""Initial schema: SAEs, harvests, contexts, examples, unit stats, explanations, jobs, keys.

Written by hand from the models (``kronscope.db.models``) and checked against them: the
autogenerate diff of a database at this revision is empty on SQLite and PostgreSQL
(``tests/db/test_migrations.py``). Per dialect:

- ``sae.active_harvest_id`` closes a cycle with ``harvest.sae_id``: PostgreSQL adds it
  with ALTER after ``harvest`` exists; SQLite (no ALTER ADD CONSTRAINT) declares it inline.
- Full-text search over explanations: SQLite gets an FTS5 table over ``explanation.text``
  (external content, kept in step by triggers, porter stemming); PostgreSQL a stored
  generated ``tsvector`` column with a GIN index. Neither is in the models; the
  ``include_name`` hook keeps them out of autogenerate.
- ``example`` has one foreign key (``context_id``, cascading): ``example.harvest_id`` is
  a plain column for the unit index, so a COPY pays one check per row, not two.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name

    op.create_table(
        "api_key",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_key_key_hash")),
    )
    op.create_index(op.f("ix_api_key_prefix"), "api_key", ["prefix"], unique=False)

    sae_active_fk = []
    if dialect == "sqlite":
        sae_active_fk.append(
            sa.ForeignKeyConstraint(
                ["active_harvest_id"],
                ["harvest.id"],
                name=op.f("fk_sae_active_harvest_id_harvest"),
                ondelete="SET NULL",
            )
        )
    op.create_table(
        "sae",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slug", sa.String(length=128), nullable=False),
        sa.Column("architecture", sa.String(length=32), nullable=False),
        sa.Column("d_in", sa.Integer(), nullable=False),
        sa.Column("d_sae", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=True),
        sa.Column("h", sa.Integer(), nullable=True),
        sa.Column("m", sa.Integer(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=True),
        sa.Column("composition", sa.String(length=32), nullable=True),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=512), nullable=True),
        sa.Column("hook_name", sa.String(length=512), nullable=True),
        sa.Column("cfg", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.Column("file_hash", sa.String(length=64), nullable=False),
        sa.Column("storage_path", sa.String(length=1024), nullable=False),
        sa.Column("active_harvest_id", sa.Integer(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        *sae_active_fk,
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sae")),
        sa.UniqueConstraint("file_hash", name=op.f("uq_sae_file_hash")),
        sa.UniqueConstraint("slug", name=op.f("uq_sae_slug")),
    )

    op.create_table(
        "harvest",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sae_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("corpus_name", sa.String(length=512), nullable=False),
        sa.Column("corpus_description", sa.Text(), nullable=True),
        sa.Column("corpus_hash", sa.String(length=64), nullable=True),
        sa.Column("n_tokens", sa.BigInteger(), nullable=False),
        sa.Column("tokens_seen", sa.BigInteger(), nullable=False),
        sa.Column("ctx_len", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("checkpoint", sa.JSON(), nullable=True),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'complete', 'failed', 'cancelled')",
            name=op.f("ck_harvest_status"),
        ),
        sa.ForeignKeyConstraint(
            ["sae_id"], ["sae.id"], name=op.f("fk_harvest_sae_id_sae"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_harvest")),
    )
    op.create_index(op.f("ix_harvest_sae_id"), "harvest", ["sae_id"], unique=False)
    if dialect != "sqlite":
        op.create_foreign_key(
            op.f("fk_sae_active_harvest_id_harvest"),
            "sae",
            "harvest",
            ["active_harvest_id"],
            ["id"],
            ondelete="SET NULL",
        )

    op.create_table(
        "token",
        sa.Column("harvest_id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["harvest_id"],
            ["harvest.id"],
            name=op.f("fk_token_harvest_id_harvest"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("harvest_id", "token_id", name=op.f("pk_token")),
    )

    op.create_table(
        "context",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("harvest_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["harvest_id"],
            ["harvest.id"],
            name=op.f("fk_context_harvest_id_harvest"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_context")),
        sa.UniqueConstraint("harvest_id", "position", name=op.f("uq_context_harvest_id_position")),
    )

    op.create_table(
        "example",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("harvest_id", sa.Integer(), nullable=False),
        sa.Column("unit_kind", sa.SmallInteger(), nullable=False),
        sa.Column("unit_index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("context_id", BIGINT_PK, nullable=False),
        sa.Column("max_value", sa.REAL(), nullable=False),
        sa.Column("max_pos", sa.SmallInteger(), nullable=False),
        sa.Column("values", sa.LargeBinary(), nullable=False),
        sa.Column("sample_pos", sa.SmallInteger(), nullable=True),
        sa.Column("sample_value", sa.REAL(), nullable=True),
        sa.ForeignKeyConstraint(
            ["context_id"],
            ["context.id"],
            name=op.f("fk_example_context_id_context"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_example")),
    )
    op.create_index(op.f("ix_example_context_id"), "example", ["context_id"], unique=False)
    op.create_index(
        "ix_example_unit",
        "example",
        ["harvest_id", "unit_kind", "unit_index", "kind", "rank"],
        unique=True,
    )

    op.create_table(
        "unit_stats",
        sa.Column("harvest_id", sa.Integer(), nullable=False),
        sa.Column("unit_kind", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("unit_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("n_active", sa.BigInteger(), nullable=False),
        sa.Column("frequency", sa.Double(), nullable=False),
        sa.Column("mean_value", sa.Double(), nullable=True),
        sa.Column("max_value", sa.Double(), nullable=False),
        sa.Column("histogram", sa.LargeBinary(), nullable=True),
        sa.Column("histogram_edges", sa.JSON(), nullable=True),
        sa.Column("both_parents_active", sa.BigInteger(), nullable=True),
        sa.Column("kept_count", sa.BigInteger(), nullable=True),
        sa.Column("logit_effects", sa.JSON(), nullable=True),
        sa.Column("neighbours", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["harvest_id"],
            ["harvest.id"],
            name=op.f("fk_unit_stats_harvest_id_harvest"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "harvest_id", "unit_kind", "unit_index", name=op.f("pk_unit_stats")
        ),
    )
    op.create_index(
        "ix_unit_stats_frequency", "unit_stats", ["harvest_id", "unit_kind", "frequency"]
    )
    op.create_index(
        "ix_unit_stats_max_value", "unit_stats", ["harvest_id", "unit_kind", "max_value"]
    )

    op.create_table(
        "explanation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sae_id", sa.Integer(), nullable=False),
        sa.Column("unit_kind", sa.SmallInteger(), nullable=False),
        sa.Column("unit_index", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("author", sa.String(length=256), nullable=True),
        sa.Column("score", sa.Double(), nullable=True),
        _ts("deleted_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["sae_id"], ["sae.id"], name=op.f("fk_explanation_sae_id_sae"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_explanation")),
    )
    op.create_index("ix_explanation_unit", "explanation", ["sae_id", "unit_kind", "unit_index"])

    op.create_table(
        "explanation_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("explanation_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("author", sa.String(length=256), nullable=True),
        sa.Column("source", sa.String(length=128), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["explanation_id"],
            ["explanation.id"],
            name=op.f("fk_explanation_revision_explanation_id_explanation"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_explanation_revision")),
    )
    op.create_index(
        op.f("ix_explanation_revision_explanation_id"), "explanation_revision", ["explanation_id"]
    )

    op.create_table(
        "job",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("sae_id", sa.Integer(), nullable=True),
        sa.Column("harvest_id", sa.Integer(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("progress_done", sa.BigInteger(), nullable=False),
        sa.Column("progress_total", sa.BigInteger(), nullable=True),
        sa.Column("rate", sa.Double(), nullable=True),
        sa.Column("eta_s", sa.Double(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("locked_by", sa.String(length=256), nullable=True),
        _ts("locked_at", nullable=True),
        _ts("heartbeat_at", nullable=True),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint("kind IN ('harvest', 'explain', 'import')", name=op.f("ck_job_kind")),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'complete', 'failed', 'cancelled')",
            name=op.f("ck_job_status"),
        ),
        sa.ForeignKeyConstraint(
            ["harvest_id"],
            ["harvest.id"],
            name=op.f("fk_job_harvest_id_harvest"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["sae_id"], ["sae.id"], name=op.f("fk_job_sae_id_sae"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job")),
    )
    op.create_index(op.f("ix_job_harvest_id"), "job", ["harvest_id"])
    op.create_index(op.f("ix_job_sae_id"), "job", ["sae_id"])
    op.create_index("ix_job_status_created_at", "job", ["status", "created_at"])

    if dialect == "sqlite":
        _create_sqlite_fts()
    elif dialect == "postgresql":
        _create_postgres_fts()


def _create_sqlite_fts() -> None:
    # External content: the text lives once, in `explanation`; FTS5 keeps only the index.
    # The 'delete' command must be given the old text, which the triggers have.
    op.execute(
        "CREATE VIRTUAL TABLE explanation_fts USING fts5("
        "text, content='explanation', content_rowid='id', "
        "tokenize='porter unicode61 remove_diacritics 2')"
    )
    op.execute(
        "CREATE TRIGGER explanation_fts_ai AFTER INSERT ON explanation BEGIN "
        "INSERT INTO explanation_fts(rowid, text) VALUES (new.id, new.text); END"
    )
    op.execute(
        "CREATE TRIGGER explanation_fts_ad AFTER DELETE ON explanation BEGIN "
        "INSERT INTO explanation_fts(explanation_fts, rowid, text) "
        "VALUES ('delete', old.id, old.text); END"
    )
    op.execute(
        "CREATE TRIGGER explanation_fts_au AFTER UPDATE OF text ON explanation BEGIN "
        "INSERT INTO explanation_fts(explanation_fts, rowid, text) "
        "VALUES ('delete', old.id, old.text); "
        "INSERT INTO explanation_fts(rowid, text) VALUES (new.id, new.text); END"
    )


def _create_postgres_fts() -> None:
    op.execute(
        "ALTER TABLE explanation ADD COLUMN search_vector tsvector "
        "GENERATED ALWAYS AS (to_tsvector('english'::regconfig, coalesce(text, ''))) STORED"
    )
    op.execute("CREATE INDEX ix_explanation_search_vector ON explanation USING gin (search_vector)")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for trigger in ("explanation_fts_au", "explanation_fts_ad", "explanation_fts_ai"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute("DROP TABLE IF EXISTS explanation_fts")
    elif dialect == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_explanation_search_vector")
        op.execute("ALTER TABLE explanation DROP COLUMN IF EXISTS search_vector")

    op.drop_index("ix_job_status_created_at", table_name="job")
    op.drop_index(op.f("ix_job_sae_id"), table_name="job")
    op.drop_index(op.f("ix_job_harvest_id"), table_name="job")
    op.drop_table("job")
    op.drop_index(op.f("ix_explanation_revision_explanation_id"), table_name="explanation_revision")
    op.drop_table("explanation_revision")
    op.drop_index("ix_explanation_unit", table_name="explanation")
    op.drop_table("explanation")
    op.drop_index("ix_unit_stats_max_value", table_name="unit_stats")
    op.drop_index("ix_unit_stats_frequency", table_name="unit_stats")
    op.drop_table("unit_stats")
    op.drop_index("ix_example_unit", table_name="example")
    op.drop_index(op.f("ix_example_context_id"), table_name="example")
    op.drop_table("example")
    op.drop_table("context")
    op.drop_table("token")
    if dialect != "sqlite":
        op.drop_constraint(op.f("fk_sae_active_harvest_id_harvest"), "sae", type_="foreignkey")
    op.drop_index(op.f("ix_harvest_sae_id"), table_name="harvest")
    op.drop_table("harvest")
    op.drop_table("sae")
    op.drop_index(op.f("ix_api_key_prefix"), table_name="api_key")
    op.drop_table("api_key")
