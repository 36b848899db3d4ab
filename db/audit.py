"""What an auditor asks of the database beyond listing results: an export with a manifest that pins it to the
hash chain, and where the image behind a result is now."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from histod.db.chain import RESULT_FIELDS
from histod.db.models import KIND_REVIEW, ModelRecord, Move, Result, utcnow
from histod.errors import ConfigError

EXPORT_FIELDS = (*RESULT_FIELDS, "chain_seq", "prev_hash", "row_hash", "row_mac")
FORMATS = ("csv", "json")
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
"""first characters that make a spreadsheet read a cell as a formula (OWASP, CSV injection)"""
CSV_ESCAPING = (
    "a text cell that starts with = + - @ tab CR or ' has one ' put in front of it (a spreadsheet would run "
    "the first four as a formula); drop one leading ' to get the stored value. Every cell is quoted."
)


def csv_cell(value: Any) -> Any:
    """``value`` for a CSV cell: text that a spreadsheet would take for a formula gets a leading ``'`` (and so
    does text that already starts with one, so that dropping one leading ``'`` always restores the value)."""
    if isinstance(value, str) and value.startswith((*FORMULA_TRIGGERS, "'")):
        return "'" + value
    return value


def write_csv(fh: Any, fieldnames: Sequence[str], rows: Iterable[dict[str, Any]], *, header: bool = True) -> None:
    """Rows as CSV for a spreadsheet or a parser: every cell quoted (a CR or LF inside a name stays inside its
    cell, so the file parses back to exactly one record per row) and formula-like text defused (:func:`csv_cell`)."""
    writer = csv.DictWriter(fh, fieldnames=list(fieldnames), lineterminator="\n", quoting=csv.QUOTE_ALL)
    if header:
        writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)


def _cell(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass(frozen=True)
class Export:
    path: Path
    manifest: Path
    rows: int
    first_hash: str | None
    last_hash: str | None
    sha256: str


def export_format(out: Path, fmt: str | None) -> str:
    """``fmt`` when given, else the file's suffix (.csv, .json)."""
    chosen = (fmt or out.suffix.lstrip(".")).lower()
    if chosen not in FORMATS:
        raise ConfigError(f"cannot tell the export format of {out}: give --format csv or --format json")
    return chosen


def export(
    session: Session, out: Path, *, fmt: str, since: datetime | None = None, until: datetime | None = None
) -> Export:
    """Write the result rows received in [since, until) (all columns the chain hashes, plus chain_seq, prev_hash,
    row_hash and row_mac), oldest first, and ``OUT.manifest.json``: row count, first and last chain hash of the rows
    exported, the export's sha256, when, and the filters."""
    query = select(*[Result.__table__.c[name] for name in EXPORT_FIELDS]).order_by(Result.id)
    if since is not None:
        query = query.where(Result.received_at >= since)
    if until is not None:
        query = query.where(Result.received_at < until)
    rows = [{k: _cell(v) for k, v in r._mapping.items()} for r in session.execute(query)]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.part")
    with partial.open("w", newline="", encoding="utf-8") as fh:
        if fmt == "csv":
            write_csv(fh, EXPORT_FIELDS, rows)
        else:
            json.dump(rows, fh, indent=2)
            fh.write("\n")
    partial.replace(out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    first = rows[0]["row_hash"] if rows else None
    last = rows[-1]["row_hash"] if rows else None
    manifest = out.with_name(out.name + ".manifest.json")
    manifest.write_text(
        json.dumps(
            {
                "file": out.name,
                "format": fmt,
                "sha256": digest,
                "rows": len(rows),
                "first_id": rows[0]["id"] if rows else None,
                "last_id": rows[-1]["id"] if rows else None,
                "first_hash": first,
                "last_hash": last,
                "generated_at": utcnow().isoformat(),
                "filters": {
                    "since": since.isoformat() if since else None,
                    "until": until.isoformat() if until else None,
                },
                "chain": "histod-chain-v1: row_hash = sha256(prev_hash + '\\n' + canonical(row)); one chain over "
                "results, moves, reports and models by chain_seq, so the previous link of a result may be another "
                "table's row; row_mac = HMAC-SHA256(key, 'histod-mac-v1\\n' + row_hash) where the service had a key",
                "csv_escaping": CSV_ESCAPING if fmt == "csv" else None,
            },
            indent=2,
        )
        + "\n"
    )
    return Export(out, manifest, len(rows), first, last, digest)


@dataclass(frozen=True)
class Subject:
    """A classification row, the file that holds its image now, and the model that made the call."""

    result: Result
    image: Path
    model: ModelRecord


def subject(session: Session, result_id: int) -> Subject:
    """Find the image behind ``result_id`` (a review resolves to the row it amends): the last successful move,
    else the planned stored_path, else the original path; it must still have the recorded sha256."""
    result = session.get(Result, result_id)
    seen: set[int] = set()
    while result is not None and result.kind == KIND_REVIEW and result.amends_id is not None:
        if result.id in seen:
            break
        seen.add(result.id)
        result = session.get(Result, result.amends_id)
    if result is None:
        raise ConfigError(f"there is no result {result_id}")
    if result.model_id is None or result.p_malignant is None:
        raise ConfigError(f"result {result.id} has no classification to explain (status {result.status})")
    model = session.get(ModelRecord, result.model_id)
    if model is None:
        raise ConfigError(f"result {result.id} names model {result.model_id}, which is not in the models table")
    moved = session.scalars(
        select(Move.path).where(Move.result_id == result.id, Move.ok.is_(True)).order_by(Move.id.desc())
    ).first()
    candidates = [Path(p) for p in (moved, result.stored_path, result.original_path) if p]
    for path in candidates:
        if path.is_file():
            if result.sha256 is not None and _sha256(path) != result.sha256:
                raise ConfigError(f"{path} is not the image of result {result.id}: its sha256 differs from the record")
            return Subject(result, path, model)
    listed = ", ".join(str(p) for p in dict.fromkeys(candidates))
    raise ConfigError(f"the image of result {result.id} is not where the database says ({listed})")


def _sha256(path: Path) -> str:
    from histod.runs import sha256_file

    return sha256_file(path)
