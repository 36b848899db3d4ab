"""The hash chain over the results table, and the model rows' own hashes.

Every result row stores ``row_hash = sha256(prev_hash + "\\n" + canonical(row))``, where ``prev_hash`` is the
``row_hash`` of the row before it by id (:data:`GENESIS` for the first row) and ``canonical`` is a fixed,
explicit serialization of every audit-relevant column (:data:`RESULT_FIELDS`, in that order):

- text as is, integers in decimal, NULL as JSON null;
- floats as Python's shortest round-trip ``repr`` (``0.7``, ``40.0``), so what SQLite or PostgreSQL give back
  as a double hashes exactly as it was written;
- timestamps as UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (naive values read from the database are UTC);
- the list is JSON with no spaces, ensure_ascii, prefixed by the format tag :data:`FORMAT`.

The ``id`` is hashed too, so renumbering or reordering rows breaks the chain. Changing anything here changes
every hash: a new format needs a new tag and a migration, never an edit.

Inserts are serialized (:func:`lock_chain`) so two writers cannot both append after the same row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from histod.db.models import ModelRecord, Move, Result

FORMAT = "histod-chain-v1"
GENESIS = "0" * 64
"""prev_hash of the first row"""
ADVISORY_LOCK_KEY = 0x48_49_53_54_4F_44  # "HISTOD": the PostgreSQL advisory lock of result inserts

RESULT_FIELDS = (
    "id",
    "kind",
    "amends_id",
    "original_path",
    "name",
    "sha256",
    "size_bytes",
    "received_at",
    "classified_at",
    "latency_ms",
    "status",
    "label",
    "p_malignant",
    "threshold",
    "model_id",
    "model_sha256",
    "run_id",
    "engine",
    "error_reason",
    "error",
    "host",
    "duplicate_of",
    "stored_path",
    "reviewer",
    "note",
)
MODEL_FIELDS = (
    "id",
    "sha256",
    "run_id",
    "run_path",
    "engine",
    "image_size",
    "threshold",
    "metrics",
    "registered_at",
    "split_sha256",
)
_FLOATS = frozenset({"latency_ms", "p_malignant", "threshold"})


def _timestamp(value: datetime) -> str:
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        return _timestamp(value)
    if name in _FLOATS:
        return repr(float(value))
    if name == "metrics":
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"cannot hash {name}={value!r} ({type(value).__name__})")
    return value


def canonical(row: Mapping[str, Any], fields: tuple[str, ...] = RESULT_FIELDS) -> str:
    """The serialization that is hashed: the format tag and the values of ``fields``, in order."""
    values = [FORMAT] + [_value(name, row.get(name)) for name in fields]
    return json.dumps(values, separators=(",", ":"), ensure_ascii=True)


def result_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    return hashlib.sha256(f"{prev_hash}\n{canonical(row)}".encode("ascii")).hexdigest()


def model_hash(row: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(row, MODEL_FIELDS).encode("ascii")).hexdigest()


def as_mapping(obj: Result | ModelRecord, fields: tuple[str, ...] = RESULT_FIELDS) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in fields}


# --- appending -------------------------------------------------------------------------------------------
def lock_chain(session: Session) -> None:
    """Take the database's write lock for the rest of this transaction, before the chain head is read.

    SQLite: ``BEGIN IMMEDIATE`` when no transaction is open yet (Python's sqlite3 opens one only at the first
    write; once it has, this connection already holds the write lock). PostgreSQL: a transaction-scoped
    advisory lock. Other databases: ``LOCK TABLE results IN EXCLUSIVE MODE``.
    """
    connection = session.connection()
    dialect = connection.dialect.name
    if dialect == "sqlite":
        raw = connection.connection.dbapi_connection
        if raw is not None and not raw.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        connection.exec_driver_sql("LOCK TABLE results IN EXCLUSIVE MODE")


def head(session: Session) -> tuple[int, str]:
    """The id and row_hash of the last result row ((0, GENESIS) for an empty table)."""
    row = session.execute(select(Result.id, Result.row_hash).order_by(Result.id.desc()).limit(1)).first()
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


# --- verifying -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Break:
    """The first place where the chain does not hold."""

    table: str
    id: int
    problem: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.table} row {self.id}: {self.problem}\n  expected {self.expected}\n  found    {self.found}"


@dataclass(frozen=True)
class Verdict:
    rows: int
    models: int
    first_hash: str | None
    last_hash: str | None
    broken: Break | None

    @property
    def ok(self) -> bool:
        return self.broken is None


def _result_rows(connection: Connection, page: int) -> Iterator[dict[str, Any]]:
    columns = [Result.__table__.c[name] for name in (*RESULT_FIELDS, "prev_hash", "row_hash")]
    after: int | None = None
    while True:
        query = select(*columns).order_by(Result.id).limit(page)
        if after is not None:
            query = query.where(Result.id > after)
        rows = [dict(r._mapping) for r in connection.execute(query)]
        if not rows:
            return
        yield from rows
        after = int(rows[-1]["id"])


def verify(session: Session, *, anchors: tuple[str, ...] = (), page: int = 2000) -> Verdict:
    """Walk the results by id and recompute every hash; stop at the first broken or missing link. Then check
    that every ``anchors`` hash (a last hash published earlier, e.g. in an export manifest) is still in the
    chain (rows removed from the end leave an intact but shorter chain), that every move names an existing
    result, and every models row against its own hash."""
    connection = session.connection()
    prev = GENESIS
    count = 0
    first: str | None = None
    seen_anchors: set[str] = set()
    wanted = set(anchors)
    broken: Break | None = None
    for row in _result_rows(connection, page):
        count += 1
        if row["prev_hash"] != prev:
            broken = Break(
                "results",
                row["id"],
                "prev_hash does not link to the row before it (a row is missing or was re-hashed)",
                prev,
                str(row["prev_hash"]),
            )
            break
        computed = result_hash(prev, row)
        if row["row_hash"] != computed:
            broken = Break(
                "results",
                row["id"],
                "content does not match row_hash (the row was changed)",
                computed,
                str(row["row_hash"]),
            )
            break
        if computed in wanted:
            seen_anchors.add(computed)
        first = first if first is not None else computed
        prev = computed
    last = prev if count else None
    if broken is None and wanted - seen_anchors:
        missing = sorted(wanted - seen_anchors)[0]
        broken = Break(
            "results",
            count,
            "an anchor hash is not in the chain (rows were removed or the chain was rebuilt)",
            missing,
            str(last),
        )
    if broken is None:
        orphan = session.execute(
            select(Move.id, Move.result_id)
            .where(~select(Result.id).where(Result.id == Move.result_id).exists())
            .order_by(Move.id)
            .limit(1)
        ).first()
        if orphan is not None:
            broken = Break(
                "moves", orphan[0], "names a result that is missing", f"results row {orphan[1]}", "no such row"
            )
    if broken is None:
        unknown = session.execute(
            select(Result.id, Result.model_id)
            .where(
                Result.model_id.is_not(None), ~select(ModelRecord.id).where(ModelRecord.id == Result.model_id).exists()
            )
            .order_by(Result.id)
            .limit(1)
        ).first()
        if unknown is not None:
            broken = Break(
                "results", unknown[0], "names a model that is missing", f"models row {unknown[1]}", "no such row"
            )
    models = 0
    if broken is None:
        for record in session.scalars(select(ModelRecord).order_by(ModelRecord.id)):
            models += 1
            computed = model_hash(as_mapping(record, MODEL_FIELDS))
            if record.row_hash != computed:
                broken = Break(
                    "models",
                    record.id,
                    "content does not match row_hash (the row was changed)",
                    computed,
                    str(record.row_hash),
                )
                break
    return Verdict(rows=count, models=models, first_hash=first, last_hash=last, broken=broken)
