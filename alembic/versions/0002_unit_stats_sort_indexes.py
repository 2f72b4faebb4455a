"""Latent-list sort indexes with the tie-break: (frequency|max_value, unit_index), one per
direction.

The list orders by a statistic and then by index ascending, in both directions. With the
index in that exact order a page is an index-only walk to its offset (then 50 lookups by
primary key), where before PostgreSQL sorted every unit of the harvest on each request.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = ("frequency", "max_value")


def upgrade() -> None:
    for key in _KEYS:
        op.drop_index(f"ix_unit_stats_{key}", table_name="unit_stats")
        op.create_index(
            f"ix_unit_stats_{key}_asc", "unit_stats", ["harvest_id", "unit_kind", key, "unit_index"]
        )
        op.create_index(
            f"ix_unit_stats_{key}_desc",
            "unit_stats",
            ["harvest_id", "unit_kind", sa.text(f"{key} DESC"), "unit_index"],
        )


def downgrade() -> None:
    for key in _KEYS:
        op.drop_index(f"ix_unit_stats_{key}_desc", table_name="unit_stats")
        op.drop_index(f"ix_unit_stats_{key}_asc", table_name="unit_stats")
        op.create_index(f"ix_unit_stats_{key}", "unit_stats", ["harvest_id", "unit_kind", key])
