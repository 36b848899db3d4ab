"""What the service, the CLI and the reports ask of the database. Functions take a Session; the caller owns
the transaction (see histod.db.session.transaction). Rows are inserted, never updated (the database's triggers
refuse it); every audit row (results, moves, reports, models) is appended to the hash chain of histod.db.chain."""

from __future__ import annotations

import hashlib
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, astuple, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, Select, Table, and_, bindparam, exists, func, insert, or_, select
from sqlalchemy.orm import Session

from histod import LABELS
from histod.db import chain
from histod.db.models import (
    FINAL_MOVE_ERRORS,
    KIND_CLASSIFICATION,
    KIND_REVIEW,
    STATUS_CLASSIFIED,
    STATUS_FAILED,
    STATUS_REVIEWED,
    ModelRecord,
    Move,
    Report,
    Result,
    TileSet,
    utcnow,
)
from histod.db.windows import Agreement, WindowRow, agreement, reviewed, window_rows
from histod.errors import ReviewError
from histod.runs import sha256_file

SPLIT_FILE = "split.csv"
CHUNK = 500
"""values in one ``IN (...)`` at most"""


def _core(session: Session) -> Connection:
    """The session's connection, for the Core statements of the service's path (a batch's queries and inserts):
    Session.execute would add its ORM machinery (about 40 µs a statement) to statements that return plain rows.
    Pending ORM objects are flushed first, as Session.execute's autoflush would."""
    if session.new or session.dirty or session.deleted:
        session.flush()
    return session.connection()


def register_model(
    session: Session,
    *,
    sha256: str,
    run_id: str,
    run_path: str,
    engine: str,
    image_size: int,
    threshold: float,
    metrics: dict[str, Any],
    split_sha256: str | None = None,
) -> ModelRecord:
    """The models row for this model file, inserted the first time it is served. ``split_sha256`` defaults to
    the sha256 of ``run_path/split.csv`` (None when the run has none)."""
    found = session.scalars(select(ModelRecord).where(ModelRecord.sha256 == sha256)).first()
    if found is not None:
        return found
    if split_sha256 is None:
        split = Path(run_path) / SPLIT_FILE
        split_sha256 = sha256_file(split) if split.is_file() else None
    chain.lock_chain(session)
    found = session.scalars(select(ModelRecord).where(ModelRecord.sha256 == sha256)).first()
    if found is not None:  # registered by another writer since the first look
        return found
    record = ModelRecord(
        sha256=sha256,
        run_id=run_id,
        run_path=run_path,
        engine=engine,
        image_size=image_size,
        threshold=float(threshold),
        metrics=metrics,
        registered_at=utcnow(),
        split_sha256=split_sha256,
    )
    chain.append(session, [record])
    return record


_FIRST_RESULTS = (
    select(Result.sha256, func.min(Result.id))
    .where(Result.sha256.in_(bindparam("digests", expanding=True)), Result.kind == KIND_CLASSIFICATION)
    .group_by(Result.sha256)
)


def first_results(session: Session, digests: Iterable[str]) -> dict[str, int]:
    """For each sha256 already recorded, the id of the first result with that content."""
    wanted = sorted(set(digests))
    found: dict[str, int] = {}
    for start in range(0, len(wanted), CHUNK):
        for digest, first in _core(session).execute(_FIRST_RESULTS, {"digests": wanted[start : start + CHUNK]}):
            if digest is not None:
                found[digest] = first
    return found


def _duplicates(session: Session, rows: Sequence[Any], last_id: int, get: Any, put: Any) -> None:
    """Set ``duplicate_of`` of each row to the first result with its sha256: an earlier row in the database or an
    earlier one of ``rows`` (which get the ids after ``last_id``, in order)."""
    first = first_results(session, (d for r in rows if (d := get(r, "sha256")) is not None))
    for row in rows:
        last_id += 1
        digest = get(row, "sha256")
        if get(row, "kind") != KIND_CLASSIFICATION or digest is None:
            continue
        if digest in first:
            put(row, "duplicate_of", first[digest])
        first.setdefault(digest, last_id)


def record_results(session: Session, results: Sequence[Result]) -> list[Result]:
    """Insert ``results`` in order, setting ``duplicate_of`` (before insert) to the first result with the same
    sha256: an earlier row in the database or an earlier one in this batch. Returns them with ids set.

    Each row is appended to the hash chain: the write lock is taken first (so no other writer can append in
    between), then every row gets the next id and its link (histod.db.chain.append)."""
    chain.lock_chain(session)
    found = chain.tails(session)
    for result in results:
        result.kind = result.kind or KIND_CLASSIFICATION  # the column default applies only at flush
    last_id = found["results"].id if "results" in found else 0
    _duplicates(session, results, last_id, getattr, setattr)
    chain.append(session, results, found)
    return list(results)


_TABLES = {
    "results": cast(Table, Result.__table__),
    "moves": cast(Table, Move.__table__),
    "tiles": cast(Table, TileSet.__table__),
}
_INSERT = {name: insert(table) for name, table in _TABLES.items()}  # Core: no ORM object per row
RESULT_COLUMNS = tuple(c.key for c in _TABLES["results"].columns)


def insert_results(session: Session, values: Sequence[dict[str, Any]]) -> None:
    """:func:`record_results` for rows given as column values (every column of :data:`RESULT_COLUMNS` but the
    chain's and ``id``, ``duplicate_of``), inserted in one statement: the service's path, without an ORM object
    per row. Sets ``id``, ``duplicate_of`` and the chain columns in ``values``."""
    if not values:
        return
    for row in values:
        for column in RESULT_COLUMNS:
            row.setdefault(column, None)
        row["kind"] = row["kind"] or KIND_CLASSIFICATION
    chain.lock_chain(session)
    found = chain.tails(session)
    last_id = found["results"].id if "results" in found else 0
    _duplicates(session, values, last_id, dict.get, dict.__setitem__)
    _insert_chained(session, "results", values, found)


def insert_moves(session: Session, values: Sequence[dict[str, Any]]) -> None:
    """Append moves rows given as column values (``result_id``, ``at``, ``ok``, ``path``, ``error``) in one
    statement; sets ``id`` and the chain columns in ``values``."""
    if values:
        chain.lock_chain(session)
        _insert_chained(session, "moves", values, chain.tails(session))


def insert_tiles(session: Session, values: Sequence[dict[str, Any]]) -> None:
    """Append tiles rows given as column values (every column of :class:`TileSet` but ``id`` and the chain's;
    ``data_sha256`` is computed here from ``data``) in one statement, after the results rows they name (in the
    same transaction); sets ``id`` and the chain columns in ``values``."""
    if not values:
        return
    for row in values:
        data = row.get("data")
        row["data_sha256"] = None if data is None else hashlib.sha256(data).hexdigest()
    chain.lock_chain(session)
    _insert_chained(session, "tiles", values, chain.tails(session))


def _insert_chained(
    session: Session, table: str, values: Sequence[dict[str, Any]], found: dict[str, chain.Tail]
) -> None:
    """The rows as links of the chain, exactly as histod.db.chain.append links ORM rows (the next id of the
    table, the next chain_seq, prev_hash, row_hash, row_mac under the audit key), then one INSERT."""
    seq, prev = chain.head(session, found)
    key: bytes | None = session.info.get(chain.KEY_INFO)
    next_id = found[table].id if table in found else 0
    fields = chain.FIELDS[table]
    for row in values:
        next_id += 1
        seq += 1
        row["id"] = next_id
        row["chain_seq"] = seq
        row["prev_hash"] = prev
        row["row_hash"] = prev = chain.link_hash(table, prev, {name: row.get(name) for name in fields})
        row["row_mac"] = chain.mac(key, prev) if key is not None else None
    _core(session).execute(_INSERT[table], list(values))


def move_values(move: Move) -> dict[str, Any]:
    """A Move (not yet added to a session) as the column values :func:`insert_moves` takes."""
    return {
        "result_id": move.result_id,
        "at": move.at or utcnow(),
        "ok": move.ok,
        "path": move.path,
        "error": move.error,
    }


def add_review(session: Session, amends_id: int, *, label: str, reviewer: str, note: str | None, host: str) -> Result:
    """A person's call on an earlier result, as a new ``review`` row that references it (the earlier row stays
    as it was). Raises ReviewError for an unknown result or label, an empty reviewer, a review, or a file that
    failed (nothing of the model's to review)."""
    canonical_label = next((known for known in LABELS if known.lower() == label.strip().lower()), None)
    if canonical_label is None:
        raise ReviewError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
    if not reviewer.strip():
        raise ReviewError("a review needs the reviewer's name (--reviewer)")
    target = session.get(Result, amends_id)
    if target is None:
        raise ReviewError(f"there is no result {amends_id}")
    if target.kind == KIND_REVIEW:
        raise ReviewError(
            f"result {amends_id} is itself a review (of result {target.amends_id}): review result {target.amends_id}"
        )
    if target.status != STATUS_CLASSIFIED:
        raise ReviewError(
            f"result {amends_id} is not a classification: the file could not be classified "
            f"({target.error_reason or target.status}), so there is no call of the model to review"
        )
    now = utcnow()
    review = Result(
        kind=KIND_REVIEW,
        amends_id=target.id,
        original_path=target.original_path,
        name=target.name,
        sha256=target.sha256,
        size_bytes=target.size_bytes,
        received_at=now,
        classified_at=now,
        latency_ms=0.0,
        status=STATUS_REVIEWED,
        label=canonical_label,
        host=host,
        stored_path=target.stored_path,
        reviewer=reviewer.strip(),
        note=note,
    )
    return record_results(session, [review])[0]


def amendments(session: Session, result_id: int) -> list[Result]:
    """The rows that amend ``result_id``, oldest first."""
    return list(session.scalars(select(Result).where(Result.amends_id == result_id).order_by(Result.id)))


def _settled() -> Any:
    """A result whose file was moved, or is gone for good (a final failed move: vanished, replaced)."""
    return exists().where(and_(Move.result_id == Result.id, or_(Move.ok.is_(True), Move.error.in_(FINAL_MOVE_ERRORS))))


def find_unmoved(session: Session, original_path: str, sha256: str | None) -> Result | None:
    """The newest result for this path and content whose file has no successful move (nor a final failed one):
    the process stopped between committing the row and moving the file. None means the file is a new event."""
    same_content = Result.sha256.is_(None) if sha256 is None else Result.sha256 == sha256
    newest = session.scalars(
        select(Result)
        .where(Result.original_path == original_path, same_content, Result.kind == KIND_CLASSIFICATION)
        .order_by(Result.id.desc())
        .limit(1)
    ).first()
    if newest is None:
        return None
    settled = session.scalar(
        select(
            exists().where(and_(Move.result_id == newest.id, or_(Move.ok.is_(True), Move.error.in_(FINAL_MOVE_ERRORS))))
        )
    )
    return None if settled else newest


def unmoved_at(session: Session, original_path: str) -> Result | None:
    """The newest classification of a file at ``original_path`` whose move is not recorded (any content), unless
    its file is gone for good (a final failed move)."""
    query = (
        select(Result)
        .where(Result.original_path == original_path, Result.kind == KIND_CLASSIFICATION, ~_settled())
        .order_by(Result.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


class Unsettled(NamedTuple):
    id: int
    original_path: str
    sha256: str | None
    stored_path: str
    status: str
    label: str | None


_UNSETTLED_AT = (
    select(Result.id, Result.original_path, Result.sha256, Result.stored_path, Result.status, Result.label)
    .where(
        Result.original_path.in_(bindparam("paths", expanding=True)),
        Result.kind == KIND_CLASSIFICATION,
        ~_settled(),
    )
    .order_by(Result.id.desc())
)
_STORED_PATHS = select(Result.stored_path).where(
    Result.stored_path.in_(bindparam("paths", expanding=True)), Result.kind == KIND_CLASSIFICATION
)


def unsettled_at(session: Session, original_paths: Iterable[str]) -> dict[str, list[Unsettled]]:
    """For each of ``original_paths`` that has any, its classifications whose file is neither moved nor gone for
    good (:func:`find_unmoved`'s and :func:`unmoved_at`'s rows for a whole batch), newest first. One query per
    CHUNK paths; nearly always nothing (a process stopped between a commit and its moves)."""
    wanted = sorted(set(original_paths))
    found: dict[str, list[Unsettled]] = {}
    for start in range(0, len(wanted), CHUNK):
        for row in _core(session).execute(_UNSETTLED_AT, {"paths": wanted[start : start + CHUNK]}):
            found.setdefault(row.original_path, []).append(Unsettled(*row))
    return found


def stored_paths_taken(session: Session, paths: Iterable[str]) -> set[str]:
    """Which of ``paths`` are some classification's stored path (:func:`stored_path_taken` for a whole batch)."""
    wanted = sorted(set(paths))
    found: set[str] = set()
    for start in range(0, len(wanted), CHUNK):
        found.update(_core(session).scalars(_STORED_PATHS, {"paths": wanted[start : start + CHUNK]}))
    return found


def moved_results(session: Session, result_ids: Iterable[int]) -> set[int]:
    """Which of ``result_ids`` have a successful move recorded."""
    wanted = sorted(set(result_ids))
    found: set[int] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        found.update(session.scalars(select(Move.result_id).where(Move.result_id.in_(chunk), Move.ok.is_(True))))
    return found


def stored_path_taken(session: Session, path: str) -> bool:
    return bool(session.scalar(stored_path_query(path)))


def stored_path_query(path: str) -> Select[tuple[bool]]:
    """Is ``path`` some classification's target? The ``kind`` condition lets SQLite use the partial unique
    index on stored_path (without it, every new file scanned the whole table). Reviews repeat the stored path
    of the classification they amend, so they take no path of their own."""
    return select(exists().where(Result.stored_path == path, Result.kind == KIND_CLASSIFICATION))


def record_moves(session: Session, moves: Iterable[Move]) -> None:
    """Append ``moves`` (new Move objects) to the chain, in one statement (:func:`insert_moves`)."""
    insert_moves(session, [move_values(m) for m in moves])


def unmoved_results(session: Session, limit: int = 1000, after_id: int = 0) -> list[Result]:
    """Results with no successful move (nor a final failed one), by id after ``after_id``: their files are still
    in the watch folder, or the process stopped after moving a file and before recording the move."""
    query = (
        select(Result)
        .where(~_settled(), Result.id > after_id, Result.kind == KIND_CLASSIFICATION)
        .order_by(Result.id)
        .limit(limit)
    )
    return list(session.scalars(query))


NOT_ATTEMPTED = "not attempted yet"
_OS_ERROR = re.compile(r"^(?:\[Errno \d+\] )?([^:]*)")


def move_reason(error: str | None) -> str:
    """The reason of a failed move without the paths: ``[Errno 28] No space left on device: '/x'`` -> ``No space
    left on device``."""
    if not error:
        return "unknown"
    match = _OS_ERROR.match(error)
    return (match.group(1).strip() if match else "") or error[:80]


def last_move_errors(session: Session, result_ids: Iterable[int]) -> dict[int, str | None]:
    """The error of the newest move row of each of ``result_ids`` that has one."""
    wanted = sorted(set(result_ids))
    last: dict[int, str | None] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        for result_id, error in session.execute(
            select(Move.result_id, Move.error).where(Move.result_id.in_(chunk)).order_by(Move.id)
        ):
            last[result_id] = error
    return last


def waiting_moves(session: Session) -> Counter[str]:
    """Files recorded but not (yet) moved, now: each by the reason of its last failed move (``not attempted yet``
    while a batch is between its commit and its moves). Files gone before their move (FINAL_MOVE_ERRORS) are not
    waiting."""
    ids = list(session.scalars(select(Result.id).where(Result.kind == KIND_CLASSIFICATION, ~_settled())))
    last = last_move_errors(session, ids)
    waiting: Counter[str] = Counter()
    for result_id in ids:
        waiting[NOT_ATTEMPTED if result_id not in last else move_reason(last[result_id])] += 1
    return waiting


@dataclass(frozen=True)
class ResultFilter:
    since: datetime | None = None
    until: datetime | None = None
    label: str | None = None
    status: str | None = None
    limit: int | None = None
    newest: bool = False
    """with ``limit``: the newest ``limit`` rows (still listed oldest first), not the oldest"""


def _filtered(query: Any, filters: ResultFilter) -> Any:
    if filters.since is not None:
        query = query.where(Result.received_at >= filters.since)
    if filters.until is not None:
        query = query.where(Result.received_at < filters.until)
    if filters.label is not None:
        query = query.where(func.lower(Result.label) == filters.label.lower())
    if filters.status is not None:
        query = query.where(Result.status == filters.status)
    return query


def list_results(session: Session, filters: ResultFilter | None = None) -> list[Result]:
    """Results received in [since, until), oldest first, optionally by label and status; at most ``limit``
    (the oldest, or with ``newest`` the newest)."""
    filters = filters if filters is not None else ResultFilter()
    query = _filtered(select(Result), filters)
    if filters.limit is not None and filters.newest:
        newest = list(session.scalars(query.order_by(Result.id.desc()).limit(filters.limit)))
        return newest[::-1]
    query = query.order_by(Result.id)
    if filters.limit is not None:
        query = query.limit(filters.limit)
    return list(session.scalars(query))


def count_results(session: Session, filters: ResultFilter | None = None) -> int:
    """How many results ``filters`` matches, ignoring its limit."""
    filters = filters if filters is not None else ResultFilter()
    return int(session.scalar(_filtered(select(func.count(Result.id)), filters)) or 0)


TILE_COUNTS = ("images", "tissue_tiles", "malignant_tiles", "with_warnings")


@dataclass
class Summary:
    """The numbers of one report window; `histod report --json` prints this."""

    period_start: datetime
    period_end: datetime
    total: int = 0
    classified: int = 0
    failed: int = 0
    by_label: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LABELS, 0))
    by_reason: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    mean_p: float | None = None
    median_p: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    throughput_per_s: float | None = None
    """events over the span from the first receipt to the last classification in the window"""
    models: list[str] = field(default_factory=list)
    """sha256 of every model that classified in the window, most used first"""
    moves_waiting: int = 0
    """files recorded but not moved, at the time of the summary (whatever the window): a move to retry"""
    moves_waiting_by_reason: dict[str, int] = field(default_factory=dict)
    moves_gone_by_reason: dict[str, int] = field(default_factory=dict)
    """results of the window whose file disappeared or was replaced before it could be moved, by reason"""
    reviews: dict[str, Any] = field(default_factory=lambda: Agreement().to_json())
    """the window's classifications reviewed by now: agreement between model and reviewers (Agreement)"""
    tiles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TILE_COUNTS, 0))
    """images of the window classified tile by tile, their tissue and malignant tiles, and images recorded with
    a scale warning (tiles rows)"""
    in_progress: list[dict[str, Any]] = field(default_factory=list)
    """images being classified tile by tile when a periodic report was written: path, tiles done and total"""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["period_start"] = self.period_start.isoformat()
        data["period_end"] = self.period_end.isoformat()
        return data


def tile_rows(session: Session, result_ids: Sequence[int]) -> dict[int, TileSet]:
    """The tiles rows of ``result_ids`` (without their packed tiles), by result id."""
    found: dict[int, TileSet] = {}
    for start in range(0, len(result_ids), CHUNK):
        chunk = result_ids[start : start + CHUNK]
        found.update((t.result_id, t) for t in session.scalars(select(TileSet).where(TileSet.result_id.in_(chunk))))
    return found


def tile_counts(session: Session, since: datetime, until: datetime) -> dict[str, int]:
    """The tiles rows of the results received in [since, until): :data:`TILE_COUNTS`."""
    rows = session.execute(
        select(TileSet.rule, TileSet.tissue_tiles, TileSet.malignant_tiles, TileSet.warnings)
        .join(Result, Result.id == TileSet.result_id)
        .where(Result.received_at >= since, Result.received_at < until)
    ).all()
    return {
        "images": sum(1 for r in rows if r.rule is not None),
        "tissue_tiles": sum(r.tissue_tiles for r in rows),
        "malignant_tiles": sum(r.malignant_tiles for r in rows),
        "with_warnings": sum(1 for r in rows if r.warnings),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(
    session: Session,
    since: datetime,
    until: datetime,
    rows: Sequence[WindowRow] | None = None,
    reviews: Agreement | None = None,
) -> Summary:
    """Summarise the results received in [since, until) (``rows``: window_rows of it, ``reviews``: its
    agreement, when already read)."""
    out = Summary(period_start=since, period_end=until)
    if rows is None:
        rows = window_rows(session, since, until)
    probabilities: list[float] = []
    latencies: list[float] = []
    models: dict[str, int] = {}
    first: datetime | None = None
    last: datetime | None = None
    for status, label, p, latency, duplicate_of, reason, model_sha, received, classified, _ in (
        astuple(r) for r in rows
    ):
        out.total += 1
        latencies.append(latency)
        first = received if first is None else min(first, received)
        last = classified if last is None else max(last, classified)
        if duplicate_of is not None:
            out.duplicates += 1
        if status == STATUS_CLASSIFIED:
            out.classified += 1
            if label is not None:
                out.by_label[label] = out.by_label.get(label, 0) + 1
            if p is not None:
                probabilities.append(p)
            if model_sha is not None:
                models[model_sha] = models.get(model_sha, 0) + 1
        elif status == STATUS_FAILED:
            out.failed += 1
            out.by_reason[reason or "unknown"] = out.by_reason.get(reason or "unknown", 0) + 1
    if probabilities:
        out.mean_p = statistics.fmean(probabilities)
        out.median_p = statistics.median(probabilities)
    out.latency_p50_ms = percentile(latencies, 50)
    out.latency_p95_ms = percentile(latencies, 95)
    if first is not None and last is not None:
        span = max((last - first).total_seconds(), 1e-3)
        out.throughput_per_s = out.total / span
    out.models = sorted(models, key=lambda k: -models[k])
    waiting = waiting_moves(session)
    out.moves_waiting = sum(waiting.values())
    out.moves_waiting_by_reason = dict(sorted(waiting.items()))
    gone = session.execute(
        select(Move.error, func.count(func.distinct(Move.result_id)))
        .join(Result, Result.id == Move.result_id)
        .where(Move.error.in_(FINAL_MOVE_ERRORS), Result.received_at >= since, Result.received_at < until)
        .group_by(Move.error)
    ).all()
    out.moves_gone_by_reason = {str(error): int(n) for error, n in sorted(gone)}
    out.reviews = (reviews if reviews is not None else agreement(reviewed(session, since, until))).to_json()
    out.tiles = tile_counts(session, since, until)
    return out


def add_report(session: Session, summary: Summary, *, host: str, model_sha256: str | None) -> Report:
    report = Report(
        period_start=summary.period_start,
        period_end=summary.period_end,
        total=summary.total,
        classified=summary.classified,
        failed=summary.failed,
        benign=summary.by_label.get(LABELS[0], 0),
        malignant=summary.by_label.get(LABELS[1], 0),
        duplicates=summary.duplicates,
        mean_p=summary.mean_p,
        median_p=summary.median_p,
        latency_p50_ms=summary.latency_p50_ms,
        latency_p95_ms=summary.latency_p95_ms,
        throughput_per_s=summary.throughput_per_s,
        model_sha256=model_sha256,
        host=host,
        summary=summary.to_json(),
    )
    chain.append(session, [report])
    return report
