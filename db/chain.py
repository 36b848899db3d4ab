"""The audit chain: every row of results, moves, reports, models and tiles is a link of ONE hash chain, and may carry
a MAC under the audit key. Checked by histod.db.verify.

A row stores ``chain_seq`` (its position, 1, 2, ... across the audit tables), ``prev_hash`` (the ``row_hash`` of
the row before it in the chain, :data:`GENESIS` for the first) and
``row_hash = sha256(prev_hash + "\\n" + canonical(row))``, where ``canonical`` is a fixed, explicit
serialization of every audit-relevant column of its table (:data:`FIELDS`, in that order):

- text as is, integers in decimal, booleans as JSON true/false, NULL as JSON null;
- floats as Python's shortest round-trip ``repr`` (``0.7``, ``40.0``), so what SQLite or PostgreSQL give back
  as a double hashes exactly as it was written;
- timestamps as UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (naive values read from the database are UTC);
- JSON columns as JSON with sorted keys and no spaces;
- the list is JSON with no spaces, ensure_ascii, prefixed by the table's tag (:data:`TAGS`: ``histod-chain-v1``
  for results, the format results rows have had since revision 0002, ``histod-chain-v1:moves`` etc. for the
  others).

The ``id`` is hashed too, so renumbering or reordering rows breaks the chain. Changing anything here changes
every hash: a new format needs a new tag and a migration, never an edit.

With an audit key (a file only the service user can read, :func:`load_key`), each row also stores
``row_mac = HMAC-SHA256(key, "histod-mac-v1\\n" + row_hash)``. ``row_hash`` covers every row before it, so the MAC
of the last row vouches for the whole chain to someone holding the key: recomputing the hashes after a change is
easy, recomputing a MAC without the key is not.

Appends are serialized (:func:`lock_chain`) so two writers cannot both append after the same row.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, Float, Integer, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import JSON

from histod.db.models import Chained, ModelRecord, Move, Report, Result, TileSet, UTCDateTime
from histod.errors import ConfigError

FORMAT = "histod-chain-v1"
GENESIS = "0" * 64
"""prev_hash of the first row"""
ADVISORY_LOCK_KEY = 0x48_49_53_54_4F_44  # "HISTOD": the PostgreSQL advisory lock of chain appends
MAC_TAG = "histod-mac-v1"
KEY_INFO = "histod.audit_key"
"""where a session factory carries the audit key (``Session.info``), see :func:`use_key`"""
KEY_BYTES = 32

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
MOVE_FIELDS = ("id", "result_id", "at", "ok", "path", "error")
REPORT_FIELDS = (
    "id",
    "created_at",
    "period_start",
    "period_end",
    "total",
    "classified",
    "failed",
    "benign",
    "malignant",
    "duplicates",
    "mean_p",
    "median_p",
    "latency_p50_ms",
    "latency_p95_ms",
    "throughput_per_s",
    "model_sha256",
    "host",
    "summary",
)
TILE_FIELDS = (
    "id",
    "result_id",
    "rule",
    "rule_cut",
    "tile_threshold",
    "grid_tiles",
    "tissue_tiles",
    "malignant_tiles",
    "malignant_share",
    "malignant_area_px",
    "malignant_area_mm2",
    "tile_px",
    "level",
    "mpp",
    "width",
    "height",
    "backend",
    "warnings",
    "seconds",
    "data_sha256",
)
"""every column but ``data``: its sha256 stands for it (histod.db.verify recomputes it)"""
CHAINED: dict[str, type[Chained]] = {
    "results": Result,
    "moves": Move,
    "reports": Report,
    "models": ModelRecord,
    "tiles": TileSet,
}
"""the audit tables, each row a link of the one chain"""
FIELDS = {
    "results": RESULT_FIELDS,
    "moves": MOVE_FIELDS,
    "reports": REPORT_FIELDS,
    "models": MODEL_FIELDS,
    "tiles": TILE_FIELDS,
}
TAGS = {
    "results": FORMAT,
    "moves": f"{FORMAT}:moves",
    "reports": f"{FORMAT}:reports",
    "models": f"{FORMAT}:models",
    "tiles": f"{FORMAT}:tiles",
}


def _kind(table: str, name: str) -> str:
    column_type = CHAINED[table].__table__.c[name].type  # type: ignore[attr-defined]
    if isinstance(column_type, UTCDateTime):
        return "time"
    if isinstance(column_type, Boolean):
        return "bool"
    if isinstance(column_type, Float):
        return "float"
    if isinstance(column_type, Integer):
        return "int"
    if isinstance(column_type, JSON):
        return "json"
    return "text"


KINDS: dict[str, dict[str, str]] = {t: {n: _kind(t, n) for n in fields} for t, fields in FIELDS.items()}
"""each hashed column's kind: text, int, float, bool, time, json"""


def _timestamp(value: datetime) -> str:
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if aware.year >= 1000:  # isoformat, much faster, writes the same; strftime does not pad a shorter year
        return aware.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return aware.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _value(name: str, value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "time" and isinstance(value, datetime):
        return _timestamp(value)
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))
    if kind == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "text" and isinstance(value, str):
        return value
    raise TypeError(f"cannot hash {name}={value!r} ({type(value).__name__}, expected {kind})")


_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
"""``json.dumps(values, separators=(",", ":"), ensure_ascii=True)`` without a new encoder per call"""
_PLAIN: dict[str, type] = {"text": str, "int": int}
"""kinds whose values of exactly this type are hashed as they are (a bool is not an int here: type, not isinstance)"""
_FIELD_KINDS = {table: tuple((name, KINDS[table][name]) for name in fields) for table, fields in FIELDS.items()}


def canonical(row: Mapping[str, Any], table: str = "results") -> str:
    """The serialization that is hashed: the table's tag and the values of its fields, in order."""
    values: list[Any] = [TAGS[table]]
    for name, kind in _FIELD_KINDS[table]:
        value = row.get(name)
        # text and integers as they are (the most common values), anything else through _value
        values.append(value if value is None or type(value) is _PLAIN.get(kind) else _value(name, value, kind))
    return _ENCODE(values)


def link_hash(table: str, prev_hash: str, row: Mapping[str, Any]) -> str:
    """``row_hash`` of a ``table`` row that follows ``prev_hash`` in the chain."""
    return hashlib.sha256(f"{prev_hash}\n{canonical(row, table)}".encode("ascii")).hexdigest()


def result_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """A results row's link hash (the form revision 0002 gave every result)."""
    return link_hash("results", prev_hash, row)


def model_hash(row: Mapping[str, Any]) -> str:
    """The content hash revision 0002 gave models rows (before they were links of the chain); migrations only."""
    values = [FORMAT] + [_value(name, row.get(name), KINDS["models"][name]) for name in MODEL_FIELDS]
    return hashlib.sha256(json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode("ascii")).hexdigest()


def mac(key: bytes, row_hash: str) -> str:
    return hmac.new(key, f"{MAC_TAG}\n{row_hash}".encode("ascii"), hashlib.sha256).hexdigest()


def as_mapping(obj: Any, fields: Sequence[str] = RESULT_FIELDS) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in fields}


# --- the audit key -----------------------------------------------------------------------------------------
def load_key(path: Path | None) -> bytes | None:
    """The audit key in ``path`` (hex, at least 32 bytes: `histod audit keygen` or `openssl rand -hex 32`), or
    None without a path. Refuses a file that group or others may read or write: ConfigError."""
    if path is None:
        return None
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"audit key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"audit key {path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"only the service user may read it (chmod 600 {path})"
            )
        text = path.read_text(encoding="ascii").strip()
    except ConfigError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read the audit key {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"audit key {path} is not hex text") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigError(f"audit key {path} is not hex text (make one with `histod audit keygen`)") from exc
    if len(key) < KEY_BYTES:
        raise ConfigError(f"audit key {path} has {len(key)} bytes; at least {KEY_BYTES} are needed")
    return key


def write_key(path: Path) -> None:
    """A new random key in ``path`` (mode 0600, never over an existing file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} exists: a key is never overwritten (rows made with it need it)") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_hex(KEY_BYTES) + "\n")


def use_key(factory: sessionmaker[Session], key: bytes | None) -> None:
    """Every row appended through ``factory``'s sessions from now on carries a MAC under ``key``."""
    if key is not None:
        factory.configure(info={**factory.kw.get("info", {}), KEY_INFO: key})


# --- appending ---------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Tail:
    """The last row of one audit table: its chain position, hash and id (both grow together)."""

    seq: int
    row_hash: str
    id: int


_TAILS = text(
    " UNION ALL ".join(
        f"SELECT '{table}' AS t, chain_seq, row_hash, id FROM "
        f"(SELECT chain_seq, row_hash, id FROM {table} ORDER BY chain_seq DESC LIMIT 1) AS last_{table}"
        for table in CHAINED
    )
)
"""one statement, written out once: it runs before every append"""


def tails(session: Session) -> dict[str, Tail]:
    """The last row of each audit table that has rows, in one round trip."""
    return {str(t): Tail(int(seq), str(digest), int(row_id)) for t, seq, digest, row_id in session.execute(_TAILS)}


def head(session: Session, found: dict[str, Tail] | None = None) -> tuple[int, str]:
    """The chain_seq and row_hash of the last row of the chain ((0, GENESIS) while it is empty)."""
    last = max((found if found is not None else tails(session)).values(), key=lambda tail: tail.seq, default=None)
    return (0, GENESIS) if last is None else (last.seq, last.row_hash)


def _with_defaults(table: str) -> list[tuple[str, Any]]:
    t = CHAINED[table].__table__  # type: ignore[attr-defined]
    return [
        (c.key, c.default)
        for c in t.columns
        if c.default is not None and (c.default.is_scalar or c.default.is_callable)
    ]


_DEFAULTS = {table: _with_defaults(table) for table in CHAINED}


def _defaults(table: str, row: Any) -> None:
    """Column defaults that SQLAlchemy would apply at flush, applied now: they are hashed."""
    for key, default in _DEFAULTS[table]:
        if getattr(row, key) is None:
            setattr(row, key, default.arg if default.is_scalar else default.arg(None))


def append(session: Session, rows: Sequence[Chained], found: dict[str, Tail] | None = None) -> None:
    """Append ``rows`` (of any audit tables, in this order) to the chain: the write lock first, then each row gets
    the next id of its table, the next chain_seq, prev_hash, row_hash and (with a key) row_mac. ``found``: the
    :func:`tails` read under the lock in this transaction, when the caller has them already."""
    if not rows:
        return
    lock_chain(session)
    found = found if found is not None else tails(session)
    seq, prev = head(session, found)
    key: bytes | None = session.info.get(KEY_INFO)
    ids = {table: tail.id for table, tail in found.items()}
    for row in rows:
        table = row.__tablename__  # type: ignore[attr-defined]
        ids[table] = ids.get(table, 0) + 1
        row.id = ids[table]  # type: ignore[attr-defined]
        _defaults(table, row)
        seq += 1
        row.chain_seq = seq
        row.prev_hash = prev
        row.row_hash = prev = link_hash(table, prev, as_mapping(row, FIELDS[table]))
        row.row_mac = mac(key, prev) if key is not None else None
        session.add(row)
    session.flush()  # ids are assigned above, so the rows go to the database in one round
