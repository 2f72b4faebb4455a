"""Explanations carry a change number (``seq``), so pages can cache them exactly.

Every insert and update of an explanation (a new text, a score, a soft delete) gives the
row a new ``seq``, larger than any earlier one of the same SAE, and the writers of one SAE
commit in ``seq`` order. A process that holds an SAE's explanations in memory, complete up
to some ``seq``, then learns everything that changed since with one indexed query
(``seq > what it has``), and knows with another (the SAE's largest ``seq``) whether
anything did. Set by the database itself (triggers), so no writer can forget it:

- PostgreSQL: a BEFORE trigger takes a transaction-scoped advisory lock on the SAE and
  draws the next value of a sequence. The lock makes a second writer of the same SAE wait
  until the first commits, so commit order is ``seq`` order (a sequence alone hands out
  numbers in the order transactions ask, not the order they commit).
- SQLite: writers are serialised by the database, so an AFTER trigger sets the SAE's
  largest ``seq`` plus one.

Existing rows are numbered in id order.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADVISORY_NAMESPACE = 0x4B58  # the first key of the two-key advisory lock: "KX"
"""The advisory lock's first key; the second is the SAE's id."""

# SQLite: what an update must touch to be a change (seq itself is not in the list, so the
# trigger's own update does not fire it again).
_SQLITE_COLUMNS = "text, source, author, score, deleted_at, unit_kind, unit_index, sae_id"
_SQLITE_SET = (
    "UPDATE explanation SET seq = (SELECT coalesce(max(e.seq), 0) + 1 FROM explanation e "
    "WHERE e.sae_id = new.sae_id) WHERE id = new.id;"
)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column(
        "explanation", sa.Column("seq", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.execute("UPDATE explanation SET seq = id")
    op.create_index("ix_explanation_seq", "explanation", ["sae_id", "seq"])
    if dialect == "postgresql":
        op.execute("CREATE SEQUENCE explanation_change_seq")
        op.execute(
            "SELECT setval('explanation_change_seq', "
            "(SELECT coalesce(max(seq), 0) + 1 FROM explanation), false)"
        )
        op.execute(f"""
            CREATE FUNCTION explanation_next_seq() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_advisory_xact_lock({ADVISORY_NAMESPACE}, NEW.sae_id);
                NEW.seq := nextval('explanation_change_seq');
                RETURN NEW;
            END $$
        """)
        op.execute(
            "CREATE TRIGGER explanation_seq BEFORE INSERT OR UPDATE ON explanation "
            "FOR EACH ROW EXECUTE FUNCTION explanation_next_seq()"
        )
    elif dialect == "sqlite":
        op.execute(
            f"CREATE TRIGGER explanation_seq_ai AFTER INSERT ON explanation BEGIN {_SQLITE_SET} END"
        )
        op.execute(
            f"CREATE TRIGGER explanation_seq_au AFTER UPDATE OF {_SQLITE_COLUMNS} ON explanation "
            f"BEGIN {_SQLITE_SET} END"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS explanation_seq ON explanation")
        op.execute("DROP FUNCTION IF EXISTS explanation_next_seq()")
        op.execute("DROP SEQUENCE IF EXISTS explanation_change_seq")
    elif dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS explanation_seq_au")
        op.execute("DROP TRIGGER IF EXISTS explanation_seq_ai")
    op.drop_index("ix_explanation_seq", table_name="explanation")
    with op.batch_alter_table("explanation") as batch:
        batch.drop_column("seq")
