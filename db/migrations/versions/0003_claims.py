"""claims: the file claims of several services sharing one PostgreSQL database

One row per file a service is working on (primary key: the file's path in the watch folder), with the holder,
and an expiry by the database's clock that the holder's heartbeat renews. Operational state, not audit: no
append-only triggers (rows are renewed, taken over and deleted). SQLite databases get the table too (one
schema everywhere) but a SQLite service never uses it: its lock file already keeps a second service away.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 04:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "claims",
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("taken_from", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("path", name=op.f("pk_claims")),
    )
    op.create_index("ix_claims_expires_at", "claims", ["expires_at"])
    op.create_index("ix_claims_worker", "claims", ["worker"])


def downgrade() -> None:
    op.drop_index("ix_claims_worker", table_name="claims")
    op.drop_index("ix_claims_expires_at", table_name="claims")
    op.drop_table("claims")
