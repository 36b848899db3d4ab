"""audit: append-only tables, the results hash chain, reviews, model provenance

- results: ``kind`` (classification | review), ``amends_id``, ``reviewer``, ``note``, ``prev_hash``,
  ``row_hash``; ``stored_path`` is unique among classifications only (a review repeats its row's path).
- models: ``split_sha256`` (sha256 of the run's split.csv) and ``row_hash``.
- Existing rows are hashed in id order (histod.db.chain, format histod-chain-v1), then triggers make
  results, models, moves and reports append-only (SQLite: RAISE(ABORT); PostgreSQL: a plpgsql function).

A later revision that rebuilds one of these tables (Alembic batch mode on SQLite copies and drops it) must
drop the triggers first and create them again after (see ``drop_triggers`` / ``create_triggers``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 02:40:00
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op

from histod.db import chain
from histod.runs import sha256_file

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY = ("results", "models", "moves", "reports")


def create_triggers(dialect: str) -> None:
    if dialect == "sqlite":
        for table in APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} are append-only'); END"
                )
    elif dialect == "postgresql":
        op.execute(
            """
            CREATE OR REPLACE FUNCTION histod_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% are append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
            END
            $$
            """
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION histod_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION histod_append_only()"
            )


def drop_triggers(dialect: str) -> None:
    if dialect == "sqlite":
        for table in APPEND_ONLY:
            for action in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
    elif dialect == "postgresql":
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS histod_append_only()")


def _split_hash(run_path: str, model_sha256: str) -> str | None:
    """split.csv's sha256, only while the run directory still holds the model that was registered."""
    run = Path(run_path)
    try:
        info = json.loads((run / "model.json").read_text())
        if model_sha256 not in (info.get("tflite_sha256"), info.get("keras_sha256")):
            return None
        split = run / "split.csv"
        return sha256_file(split) if split.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _backfill(bind: sa.Connection) -> None:
    meta = sa.MetaData()
    results = sa.Table("results", meta, autoload_with=bind)
    models = sa.Table("models", meta, autoload_with=bind)
    prev = chain.GENESIS
    for row in bind.execute(sa.select(results).order_by(results.c.id)).mappings().all():
        values: dict[str, Any] = dict(row)
        values["kind"] = values.get("kind") or "classification"
        digest = chain.result_hash(prev, values)
        bind.execute(
            results.update()
            .where(results.c.id == row["id"])
            .values(kind=values["kind"], prev_hash=prev, row_hash=digest)
        )
        prev = digest
    for row in bind.execute(sa.select(models).order_by(models.c.id)).mappings().all():
        values = dict(row)
        if isinstance(values["metrics"], str):  # JSON read back as text by some drivers
            values["metrics"] = json.loads(values["metrics"])
        values["split_sha256"] = _split_hash(values["run_path"], values["sha256"])
        bind.execute(
            models.update()
            .where(models.c.id == row["id"])
            .values(split_sha256=values["split_sha256"], row_hash=chain.model_hash(values))
        )


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("split_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=20), nullable=False, server_default="classification"))
        batch_op.add_column(sa.Column("amends_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("reviewer", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("note", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
        batch_op.create_foreign_key(op.f("fk_results_amends_id_results"), "results", ["amends_id"], ["id"])
        batch_op.drop_constraint("uq_results_stored_path", type_="unique")

    _backfill(bind)

    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("row_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(op.f("uq_results_row_hash"), ["row_hash"])
        batch_op.create_index(
            "uq_results_stored_path",
            ["stored_path"],
            unique=True,
            sqlite_where=sa.text("kind = 'classification'"),
            postgresql_where=sa.text("kind = 'classification'"),
        )
    create_triggers(bind.dialect.name)


def downgrade() -> None:
    """Fails while review rows exist (they repeat the stored_path of the row they amend)."""
    bind = op.get_bind()
    drop_triggers(bind.dialect.name)
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_index("uq_results_stored_path")
        batch_op.drop_constraint(op.f("uq_results_row_hash"), type_="unique")
        batch_op.drop_constraint(op.f("fk_results_amends_id_results"), type_="foreignkey")
        for column in ("row_hash", "prev_hash", "note", "reviewer", "amends_id", "kind"):
            batch_op.drop_column(column)
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.create_unique_constraint(op.f("uq_results_stored_path"), ["stored_path"])
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("row_hash")
        batch_op.drop_column("split_sha256")
