"""tiles: how each image met the model's scale, a link of the audit chain

- ``tiles``: at most one row per result (``result_id`` unique): a tiled image's rule, tile counts, malignant
  area and its tissue tiles packed in ``data`` (x, y, p, tissue per tile; histod.tiling.TILE_RECORD) with
  ``data_sha256``; or only the scale warnings of an image classified whole.
- Rows are links of the one chain (tag ``histod-chain-v1:tiles``; ``data`` is covered by ``data_sha256``) and
  append-only like the other audit tables. Nothing existing is changed: every row chained before verifies as it
  did.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 20:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "tiles"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("rule", sa.String(length=40), nullable=True),
        sa.Column("rule_cut", sa.Float(), nullable=True),
        sa.Column("tile_threshold", sa.Float(), nullable=True),
        sa.Column("grid_tiles", sa.Integer(), nullable=False),
        sa.Column("tissue_tiles", sa.Integer(), nullable=False),
        sa.Column("malignant_tiles", sa.Integer(), nullable=False),
        sa.Column("malignant_share", sa.Float(), nullable=True),
        sa.Column("malignant_area_px", sa.Float(), nullable=True),
        sa.Column("malignant_area_mm2", sa.Float(), nullable=True),
        sa.Column("tile_px", sa.Float(), nullable=True),
        sa.Column("level", sa.Integer(), nullable=True),
        sa.Column("mpp", sa.Float(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("backend", sa.String(length=20), nullable=True),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("data_sha256", sa.String(length=64), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.Column("chain_seq", sa.Integer(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.Column("row_mac", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name=op.f("fk_tiles_result_id_results")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tiles")),
        sa.UniqueConstraint("result_id", name=op.f("uq_tiles_result_id")),
        sa.UniqueConstraint("chain_seq", name=op.f("uq_tiles_chain_seq")),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {TABLE}_no_{action.lower()} BEFORE {action} ON {TABLE} "
                f"BEGIN SELECT RAISE(ABORT, '{TABLE} are append-only'); END"
            )
    elif dialect == "postgresql":  # histod_append_only() is revision 0002's
        op.execute(
            f"CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION histod_append_only()"
        )
        op.execute(
            f"CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} "
            "FOR EACH STATEMENT EXECUTE FUNCTION histod_append_only()"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_no_{action}")
    elif dialect == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_append_only ON {TABLE}")
        op.execute(f"DROP TRIGGER IF EXISTS {TABLE}_no_truncate ON {TABLE}")
    op.drop_table(TABLE)
