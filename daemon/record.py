"""The record stage of the pipeline (histod.daemon.pipeline) and the database side of moves.

Exactly once: a file's row is committed before the file is moved, and the row already names the target. If the
process dies after the commit and before the move, the file is still in the watch folder; when it is seen
again, :func:`record_batch` finds the row for the same path and the same sha256 with no successful move, and
only moves it. Content seen before under any path is a new event, recorded with ``duplicate_of``. A move that
fails (permissions, disk full) is recorded as a failed Move; the file stays and is retried. With several
services on one PostgreSQL database, :func:`record_batch` and :func:`save_moves` also check the service's claims
on the files in their transactions (histod.daemon.claims).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from histod import LABELS
from histod.daemon.intake import Item
from histod.daemon.mover import PlannedMove, dated_dir, plan_tree_target
from histod.db import chain, queries
from histod.db import claims as claim_rows
from histod.db.models import (
    KIND_CLASSIFICATION,
    MOVE_REPLACED,
    MOVE_VANISHED,
    STATUS_CLASSIFIED,
    STATUS_FAILED,
    Move,
    utcnow,
)
from histod.db.paths import display, path_text, text_path
from histod.db.session import reading, transaction
from histod.errors import DatabaseError
from histod.logs import get_logger

if TYPE_CHECKING:
    from histod.daemon.claims import Claims

log: Any = get_logger("histod.service")

RECORD_RETRIES = (0.2, 0.5, 1.0, 2.0, 4.0)
"""seconds to wait before each new attempt when the database refuses a batch (locked past the busy timeout)"""


@dataclass(frozen=True)
class Served:
    """The model the service is using, as registered in the `models` table."""

    model_id: int
    sha256: str
    run_id: str
    engine: str
    threshold: float


@dataclass(frozen=True)
class Destination:
    """Where recorded files go: processed/ or failed/, then ``YYYY-MM-DD/`` and the path below the watch folder."""

    processed_dir: Path
    failed_dir: Path
    watch_dir: Path | None = None


def record_batch(
    factory: sessionmaker[Session],
    items: Sequence[Item],
    *,
    served: Served,
    host: str,
    to: Destination,
    reserved: set[Path],
    moves: Sequence[tuple[Move, Path | None]] = (),
    retries: Sequence[float] = RECORD_RETRIES,
    on_wait: Callable[[], None] | None = None,
    claims: Claims | None = None,
) -> list[PlannedMove]:
    """ONE transaction for the batch: what is already recorded (one query), the targets (one query; names in
    ``reserved`` are taken), a row per new file, and a final move for an earlier row of a path whose file is gone.
    ``moves``: rows of moves made since the last transaction, saved in this one too (see :func:`save_moves`).
    Returns the moves to make (their targets are added to ``reserved``). Retried while the database is locked;
    raises DatabaseError when it stays unavailable (the files are then still in the watch folder, and ``moves``
    still unsaved).

    The write lock is taken first, so that targets are planned against every committed row, whichever service
    wrote it. With ``claims`` (several services on one database) the same transaction renews and locks this
    service's claims on the files; a file whose claim was taken over is left out (its new holder records it)."""
    for attempt in range(len(retries) + 1):
        try:
            with transaction(factory) as session:
                _save(session, moves, claims)
                recovered, planned = _record(session, items, served, host, to, reserved, claims)
            reserved.update(m.target for m in planned)
            return recovered + planned
        except DatabaseError as exc:
            if attempt == len(retries):
                raise
            log.warning("record.retried", attempt=attempt + 1, files=len(items), error=str(exc))
            if claims is not None:
                claims.forget(i.path for i in items)  # the renewals were rolled back
            if on_wait is not None:
                on_wait()  # e.g. tell systemd's watchdog that the loop is alive, only waiting
            time.sleep(retries[attempt])
    raise AssertionError("unreachable")  # pragma: no cover


def _record(
    session: Session,
    items: Sequence[Item],
    served: Served,
    host: str,
    to: Destination,
    reserved: set[Path],
    claims: Claims | None,
) -> tuple[list[PlannedMove], list[PlannedMove]]:
    """The moves of files recorded before (recovered), and those of the rows inserted now."""
    chain.lock_chain(session)
    mine = list(items)
    if claims is not None:
        held = claims.hold(session, [i.path for i in items])
        mine = [i for i in items if i.path in held]
    earlier = queries.unsettled_at(session, (path_text(i.path) for i in mine))
    recovered: list[PlannedMove] = []
    fresh: list[Item] = []
    closing: list[Move] = []
    for item in mine:
        older = earlier.get(path_text(item.path), [])
        same = next((r for r in older if r.sha256 == item.sha256), None)
        if same is not None:  # recorded, never moved (the process stopped in between): only move it
            line = {"result_id": same.id, "status": same.status, "label": same.label, "recovered": True}
            recovered.append(PlannedMove(same.id, item.path, text_path(same.stored_path), line, item.identity))
            continue
        if older:  # an earlier file of this name, recorded, never moved: where is it?
            closing.append(_whereabouts(older[0]))
        fresh.append(item)
    placed = _targets(session, fresh, to, reserved)
    rows = [to_result(item, served, host, target, name) for item, (target, name) in zip(fresh, placed, strict=True)]
    queries.insert_results(session, rows)
    tiles = [tile_row(item, row["id"], served) for item, row in zip(fresh, rows, strict=True) if _has_tiles(item)]
    queries.insert_tiles(session, tiles)
    queries.record_moves(session, closing)
    moves = [
        PlannedMove(row["id"], item.path, target, line_of(row, item), item.identity)
        for row, item, (target, _) in zip(rows, fresh, placed, strict=True)
    ]
    return recovered, moves


def recorded_before(factory: sessionmaker[Session], items: Sequence[Item]) -> set[Path]:
    """Which of ``items`` already have a row for the same path and sha256 whose file was never moved (the process
    stopped between the commit and the move): they are only to be moved (:func:`record_batch` finds the row), not
    classified again. One read; DatabaseError is the caller's."""
    with reading(factory) as session:
        earlier = queries.unsettled_at(session, (path_text(i.path) for i in items))
    return {i.path for i in items if any(r.sha256 == i.sha256 for r in earlier.get(path_text(i.path), []))}


def _whereabouts(row: queries.Unsettled) -> Move:
    """The Move of a recorded file whose name now holds other content: at its target (moved, the move not
    recorded), else replaced before it could be moved."""
    stored = text_path(row.stored_path)
    if os.path.lexists(stored):
        return Move(result_id=row.id, at=utcnow(), ok=True, path=row.stored_path, error=None)
    log.warning("image.replaced", path=row.original_path, result_id=row.id, stored=None)
    return Move(result_id=row.id, at=utcnow(), ok=False, path=row.stored_path, error=MOVE_REPLACED)


def _targets(session: Session, fresh: Sequence[Item], to: Destination, reserved: set[Path]) -> list[tuple[Path, str]]:
    """A unique target and the row's name for each file. Whether a name is some row's stored path is asked of the
    database once for the first choice of every file and folder, and only again for a name that collides."""
    placed = []
    for item in fresh:
        root = to.processed_dir if item.error is None and item.p is not None else to.failed_dir
        placed.append((dated_dir(root, item.received_at), shown_parts(item.path, to.watch_dir)))
    firsts = {folder.joinpath(*parts[: k + 1]) for folder, parts in placed for k in range(len(parts))}
    stored = queries.stored_paths_taken(session, (path_text(p) for p in firsts))
    here: set[Path] = set()
    pending_dirs: set[Path] = {d for t in reserved for d in t.parents}

    def taken(path: Path) -> bool:
        if path in reserved or path in here:
            return True
        if path in firsts:
            return path_text(path) in stored
        return queries.stored_path_taken(session, path_text(path))

    out = []
    for folder, parts in placed:
        target = plan_tree_target(folder, parts, taken, pending_dirs)
        here.add(target)
        pending_dirs.update(target.parents)
        out.append((target, "/".join(parts)))
    return out


def shown_parts(path: Path, watch_dir: Path | None) -> list[str]:
    """``path`` below ``watch_dir`` (its name alone when it is not below it), each part as shown
    (histod.db.paths.display): the row's name is these joined with ``/``, the target keeps them as folders."""
    relative = path.relative_to(watch_dir) if watch_dir is not None and watch_dir in path.parents else Path(path.name)
    return [display(part) for part in relative.parts]


def to_result(item: Item, served: Served, host: str, stored: Path, name: str | None = None) -> dict[str, Any]:
    """The results row of a classified (or failed) file, as column values (histod.db.queries.insert_results). A
    tiled image's p is its aggregation rule's score and its threshold the rule's cut, so that every row's label is
    ``p >= threshold``; the model's threshold for each tile is in its tiles row."""
    ok = item.error is None and item.p is not None
    p = item.p if ok else None
    threshold = served.threshold if item.tiled is None else item.tiled.aggregate.cut
    classified_at = item.classified_at or utcnow()
    return {
        "kind": KIND_CLASSIFICATION,
        "original_path": path_text(item.path),
        "name": name if name is not None else display(item.path.name),
        "sha256": item.sha256,
        "size_bytes": item.size_bytes,
        "received_at": item.received_at,
        "classified_at": classified_at,
        "latency_ms": (classified_at - item.received_at).total_seconds() * 1000,
        "status": STATUS_CLASSIFIED if ok else STATUS_FAILED,
        "label": (LABELS[1] if p >= threshold else LABELS[0]) if p is not None else None,
        "p_malignant": p,
        "threshold": threshold,
        "model_id": served.model_id,
        "model_sha256": served.sha256,
        "run_id": served.run_id,
        "engine": served.engine,
        "error_reason": item.error.reason if item.error is not None else None,
        "error": display(str(item.error.args[0])) if item.error is not None else None,
        "host": host,
        "stored_path": path_text(stored),
    }


def _has_tiles(item: Item) -> bool:
    return item.error is None and (item.tiled is not None or bool(item.warnings))


def tile_row(item: Item, result_id: int, served: Served) -> dict[str, Any]:
    """The tiles row of a tiled image (its summary and packed tiles) or of an image classified whole with a scale
    warning, as column values (histod.db.queries.insert_tiles)."""
    tiled = item.tiled
    if tiled is None:
        return {
            **dict.fromkeys((*chain.TILE_FIELDS, "data")),  # NULL but for these:
            "result_id": result_id,
            "grid_tiles": 0,
            "tissue_tiles": 0,
            "malignant_tiles": 0,
            "warnings": list(item.warnings),
        }
    a = tiled.aggregate
    return {
        "result_id": result_id,
        "rule": a.rule,
        "rule_cut": a.cut,
        "tile_threshold": served.threshold,
        "grid_tiles": tiled.n_tiles,
        "tissue_tiles": a.n_tissue,
        "malignant_tiles": a.n_malignant,
        "malignant_share": a.malignant_share,
        "malignant_area_px": a.malignant_area_px,
        "malignant_area_mm2": tiled.malignant_area_mm2,
        "tile_px": float(tiled.tile_side),
        "level": tiled.level,
        "mpp": tiled.mpp,
        "width": tiled.width,
        "height": tiled.height,
        "backend": tiled.backend,
        "warnings": list(tiled.warnings),
        "seconds": round(tiled.seconds, 3),
        "data": tiled.packed(),
    }


def line_of(row: dict[str, Any], item: Item | None = None) -> dict[str, Any]:
    """The recorded part of a file's canonical log line (with a tiled image's tile counts and any scale
    warnings)."""
    p = row["p_malignant"]
    line = {
        "result_id": row["id"],
        "status": row["status"],
        "label": row["label"],
        "p": None if p is None else round(p, 4),
        "ms": round(row["latency_ms"], 1),
        "reason": row["error_reason"],
        "duplicate_of": row["duplicate_of"],
    }
    if item is not None and item.tiled is not None:
        a = item.tiled.aggregate
        line.update(rule=a.rule, tissue_tiles=a.n_tissue, malignant_tiles=a.n_malignant)
    if item is not None and item.warnings:
        line["warnings"] = list(item.warnings)
    return line


# --- saving moves ------------------------------------------------------------------------------------------
def save_moves(
    factory: sessionmaker[Session],
    moves: Sequence[Move],
    *,
    claims: Claims | None = None,
    sources: Sequence[Path | None] = (),
) -> bool:
    """Best effort: the files are where they are. False when the database refused the rows (the caller may
    try again; otherwise the next start's :func:`settle_moves` records the successful ones).

    With ``claims``: ``sources[i]`` is the file of ``moves[i]``, whose claim the same transaction deletes (None:
    keep the claim, the move is to be retried); a row whose claim is no longer this service's is not saved."""
    if not moves:
        return True
    try:
        with transaction(factory) as session:
            _save(session, list(zip(moves, sources or [None] * len(moves), strict=True)), claims)
    except DatabaseError as exc:
        log.warning("moves.refused", count=len(moves), error=str(exc))
        return False
    return True


def _save(session: Session, moves: Sequence[tuple[Move, Path | None]], claims: Claims | None) -> None:
    if not moves:
        return
    keep = [m for m, _ in moves]
    if claims is not None:
        released = claims.release(session, [s for _, s in moves if s is not None])
        keep = [m for m, s in moves if s is None or s in released]
        if len(keep) < len(moves):
            log.warning("moves.dropped", count=len(moves) - len(keep), reason="claim lost")
    queries.record_moves(session, keep)


def settle_moves(factory: sessionmaker[Session], page: int = 1000, *, shared: bool = False) -> int:
    """At start-up: record the moves that happened but were not recorded (the process stopped between the
    move and its Move row), and the files that disappeared from the watch folder before their move, so that the
    moves table says where every file is. Returns how many. With ``shared``
    (several services on one database), files some service has a claim on are left to that claim."""
    found: list[tuple[Move, str]] = []
    after = 0
    while True:
        with reading(factory) as session:
            batch = queries.unmoved_results(session, limit=page, after_id=after)
        if not batch:
            break
        after = batch[-1].id
        for row in batch:
            original, stored = text_path(row.original_path), text_path(row.stored_path)
            if os.path.lexists(original):
                continue  # still in the watch folder: its next batch moves it (or takes other content as new)
            there = os.path.lexists(stored)
            error = None if there else MOVE_VANISHED  # neither here nor there: removed while the service was down
            found.append((Move(result_id=row.id, ok=there, path=row.stored_path, error=error), row.original_path))
    if not found:
        return 0
    if not shared:
        save_moves(factory, [m for m, _ in found])
        log.info("moves.settled", count=len(found))
        return len(found)
    try:
        with transaction(factory) as session:
            chain.lock_chain(session)  # one settler at a time: two starting together would both save a move
            # claims first, then moves: a service deletes a file's claim and saves its move in one transaction,
            # so whatever this first look sees of that transaction, the second sees the move
            busy = claim_rows.claimed(session, (o for _, o in found))
            moved = queries.moved_results(session, [m.result_id for m, o in found if o not in busy])
            keep = [m for m, o in found if o not in busy and m.result_id not in moved]
            queries.record_moves(session, keep)
    except DatabaseError as exc:
        log.warning("moves.refused", count=len(found), error=str(exc))
        return 0
    if keep:
        log.info("moves.settled", count=len(keep))
    return len(keep)


def settle_claimed(factory: sessionmaker[Session], paths: Collection[Path], claims: Claims) -> int:
    """Claims taken over from a service that died, on files no longer in the watch folder: record the move of
    a result whose file is at its target (the service moved it, then died before saving the move), then delete
    the claims. Returns the moves recorded. Raises DatabaseError."""
    with transaction(factory) as session:
        chain.lock_chain(session)
        held = claims.hold(session, list(paths))
        found: list[Move] = []
        for path in sorted(held):
            row = queries.unmoved_at(session, path_text(path))
            if row is not None and not os.path.lexists(path) and os.path.lexists(text_path(row.stored_path)):
                found.append(Move(result_id=row.id, ok=True, path=row.stored_path, error=None))
        queries.record_moves(session, found)
        claims.release(session, sorted(held))
    if found:
        log.info("moves.settled", count=len(found), taken_over=True)
    return len(found)
