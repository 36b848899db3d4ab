"""initial schema: models, results, moves, reports

Timestamps are naive UTC (histod.db.models.UTCDateTime). Written once; later schema changes are new revisions.

Revision ID: 0001
Revises: -
Create Date: 2026-11-26 01:32:27.029383
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=200), nullable=False),
        sa.Column("run_path", sa.Text(), nullable=False),
        sa.Column("engine", sa.String(length=20), nullable=False),
        sa.Column("image_size", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("registered_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("sha256", name=op.f("uq_models_sha256")),
    )
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("period_end", sa.DateTime(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("classified", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("benign", sa.Integer(), nullable=False),
        sa.Column("malignant", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("mean_p", sa.Float(), nullable=True),
        sa.Column("median_p", sa.Float(), nullable=True),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("throughput_per_s", sa.Float(), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reports")),
    )
    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("original_path", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("size_bytes", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("classified_at", sa.DateTime(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("label", sa.String(length=40), nullable=True),
        sa.Column("p_malignant", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("run_id", sa.String(length=200), nullable=True),
        sa.Column("engine", sa.String(length=20), nullable=True),
        sa.Column("error_reason", sa.String(length=40), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("duplicate_of", sa.Integer(), nullable=True),
        sa.Column("stored_path", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["duplicate_of"], ["results.id"], name=op.f("fk_results_duplicate_of_results")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_results_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_results")),
        sa.UniqueConstraint("stored_path", name=op.f("uq_results_stored_path")),
    )
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.create_index("ix_results_original_path", ["original_path"], unique=False)
        batch_op.create_index("ix_results_received_at", ["received_at"], unique=False)
        batch_op.create_index("ix_results_sha256", ["sha256"], unique=False)
        batch_op.create_index("ix_results_status_label", ["status", "label"], unique=False)

    op.create_table(
        "moves",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name=op.f("fk_moves_result_id_results")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_moves")),
    )
    with op.batch_alter_table("moves", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_moves_result_id"), ["result_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("moves", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_moves_result_id"))

    op.drop_table("moves")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_index("ix_results_status_label")
        batch_op.drop_index("ix_results_sha256")
        batch_op.drop_index("ix_results_received_at")
        batch_op.drop_index("ix_results_original_path")

    op.drop_table("results")
    op.drop_table("reports")
    op.drop_table("models")
