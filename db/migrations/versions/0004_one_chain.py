"""one chain: results, moves, reports and models rows are links of one hash chain, with an optional MAC

- every audit table gets ``chain_seq`` (the row's position in the chain, unique) and ``row_mac`` (HMAC-SHA256
  under the audit key, NULL when written without one); moves and reports get ``prev_hash`` and ``row_hash``,
  models ``prev_hash`` (its ``row_hash`` was a hash of its own content).
- Existing rows are sealed in this order: results by id (their hashes are kept, so anchors published before
  stay in the chain), then models, moves and reports by id, each linked to the row before it. A models row
  whose content no longer matches its revision-0002 hash is not sealed: the migration stops and names it.
- The append-only triggers are dropped for the backfill and created again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 12:00:00
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.types import NullType

from histod.db import chain
from histod.db.verify import BrokenChainError, typed_values
from histod.errors import DatabaseError

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEALED_AFTER_RESULTS = ("models", "moves", "reports")
AUDIT_TABLES = ("results", *SEALED_AFTER_RESULTS)
_triggers: Any = importlib.import_module("histod.db.migrations.versions.0002_audit")


def _raw(bind: sa.Connection, table: str) -> list[dict[str, Any]]:
    t = sa.Table(table, sa.MetaData(), autoload_with=bind)
    columns = [sa.type_coerce(c, NullType()).label(c.name) for c in t.columns]
    return [dict(r._mapping) for r in bind.execute(sa.select(*columns).order_by(t.c.id))]


def _typed(table: str, raw: dict[str, Any]) -> dict[str, Any]:
    try:
        return typed_values(table, raw)
    except BrokenChainError as exc:
        found = exc.found
        raise DatabaseError(f"cannot seal the audit chain: {found.table} row {found.id}: {found.problem}") from exc


def _seal(bind: sa.Connection) -> None:
    meta = sa.MetaData()
    tables = {name: sa.Table(name, meta, autoload_with=bind) for name in AUDIT_TABLES}
    seq, prev = 0, chain.GENESIS
    results = tables["results"]
    for row in _raw(bind, "results"):
        seq += 1
        bind.execute(results.update().where(results.c.id == row["id"]).values(chain_seq=seq))
        prev = str(row["row_hash"])
    for name in SEALED_AFTER_RESULTS:
        table = tables[name]
        for row in _raw(bind, name):
            values = _typed(name, row)
            if name == "models" and row["row_hash"] != chain.model_hash(values):
                raise DatabaseError(
                    f"cannot seal the audit chain: models row {row['id']} does not match its row_hash (the row was "
                    "changed); a changed row is not sealed again"
                )
            seq += 1
            digest = chain.link_hash(name, prev, values)
            bind.execute(
                table.update().where(table.c.id == row["id"]).values(chain_seq=seq, prev_hash=prev, row_hash=digest)
            )
            prev = digest


def upgrade() -> None:
    bind = op.get_bind()
    _triggers.drop_triggers(bind.dialect.name)
    for name in AUDIT_TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.add_column(sa.Column("chain_seq", sa.Integer(), nullable=True))
            if name != "results":
                batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
            if name in ("moves", "reports"):
                batch_op.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
            batch_op.add_column(sa.Column("row_mac", sa.String(length=64), nullable=True))
    _seal(bind)
    for name in AUDIT_TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.alter_column("chain_seq", existing_type=sa.Integer(), nullable=False)
            if name != "results":
                batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
                batch_op.alter_column("row_hash", existing_type=sa.String(length=64), nullable=False)
            batch_op.create_unique_constraint(op.f(f"uq_{name}_chain_seq"), ["chain_seq"])
            if name == "results":  # a rebuilt table (SQLite batch mode) loses the partial index: made again
                batch_op.drop_index("uq_results_stored_path")
                batch_op.create_index(
                    "uq_results_stored_path",
                    ["stored_path"],
                    unique=True,
                    sqlite_where=sa.text("kind = 'classification'"),
                    postgresql_where=sa.text("kind = 'classification'"),
                )
    _triggers.create_triggers(bind.dialect.name)


def downgrade() -> None:
    """Back to per-row model hashes and a chain of results only (moves and reports lose their hashes)."""
    bind = op.get_bind()
    _triggers.drop_triggers(bind.dialect.name)
    models = sa.Table("models", sa.MetaData(), autoload_with=bind)
    for row in _raw(bind, "models"):
        bind.execute(
            models.update().where(models.c.id == row["id"]).values(row_hash=chain.model_hash(_typed("models", row)))
        )
    for name in AUDIT_TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.drop_constraint(op.f(f"uq_{name}_chain_seq"), type_="unique")
            batch_op.drop_column("row_mac")
            batch_op.drop_column("chain_seq")
            if name in ("moves", "reports"):
                batch_op.drop_column("row_hash")
            if name != "results":
                batch_op.drop_column("prev_hash")
        if name == "models":
            with op.batch_alter_table(name, schema=None) as batch_op:
                batch_op.alter_column("row_hash", existing_type=sa.String(length=64), nullable=True)
    _triggers.create_triggers(bind.dialect.name)
