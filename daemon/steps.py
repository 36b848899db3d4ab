"""The steps one batch goes through: intake -> classify (decode + infer) -> record -> move. Each is a function of
its inputs, testable alone on a real folder and a real SQLite file; histod.daemon.service strings them together.

Exactly once: a file's row is committed before the file is moved, and the row already names the target.
If the process dies after the commit and before the move, the file is still in the watch folder; when it
is seen again, :func:`intake` finds the row for the same path and the same sha256 with no successful move,
and only moves it. Content seen before under any path is a new event, recorded with ``duplicate_of``.
A move that fails (permissions, disk full) is recorded as a failed Move; the file stays and is retried.
With several services on one PostgreSQL database, :func:`record` and :func:`save_moves` also check the service's
claims on the files in their transactions (histod.daemon.claims).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session, sessionmaker

from histod import LABELS
from histod.daemon.intake import Taken, take
from histod.daemon.mover import Identity, SourceReplacedError, dated_dir, move_file, plan_tree_target
from histod.db import chain, queries
from histod.db import claims as claim_rows
from histod.db.models import MOVE_REPLACED, MOVE_VANISHED, STATUS_CLASSIFIED, STATUS_FAILED, Move, Result, utcnow
from histod.db.paths import display, path_text, text_path
from histod.db.session import reading, transaction
from histod.errors import DatabaseError, ImageError
from histod.imaging import decode
from histod.logs import get_logger

if TYPE_CHECKING:
    from histod.daemon.claims import Claims

log: Any = get_logger("histod.service")

VANISHED = MOVE_VANISHED
REPLACED = MOVE_REPLACED

RECORD_RETRIES = (0.2, 0.5, 1.0, 2.0, 4.0)
"""seconds to wait before each new attempt when the database refuses a batch (locked past the busy timeout)"""


class Predictor(Protocol):
    image_size: int
    threshold: float

    def predict(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]: ...


@dataclass(frozen=True)
class Served:
    """The model the service is using, as registered in the `models` table."""

    model_id: int
    sha256: str
    run_id: str
    engine: str
    threshold: float


@dataclass(frozen=True)
class Outcome:
    taken: Taken
    classified_at: datetime
    p: float | None
    error: ImageError | None


@dataclass(frozen=True)
class PlannedMove:
    result_id: int
    source: Path
    target: Path
    line: dict[str, Any]
    """the file's canonical log line, completed once the move is done"""
    identity: Identity | None = None
    """the entry that was read: another one at ``source`` is not moved under this result (it is a new event)"""


# --- the steps -------------------------------------------------------------------------------------------
def intake(
    arrivals: Sequence[tuple[Path, datetime]],
    factory: sessionmaker[Session],
    *,
    max_bytes: int,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[list[Taken], list[PlannedMove]]:
    """Read and hash each file (in ``pool`` when given); files already recorded but not moved come back as
    moves only."""

    def one(arrival: tuple[Path, datetime]) -> Taken | None:
        return take(arrival[0], arrival[1], max_bytes=max_bytes)

    read = list(pool.map(one, arrivals)) if pool is not None else [one(a) for a in arrivals]
    fresh: list[Taken] = []
    recover: list[PlannedMove] = []
    gone: list[Move] = []
    with reading(factory) as session:
        for taken in read:
            if taken is None:
                continue
            path = taken.path
            row = queries.find_unmoved(session, path_text(path), taken.sha256)
            if row is None:
                fresh.append(taken)
                older = queries.unmoved_at(session, path_text(path))
                if older is not None:  # an earlier file of this name, recorded, never moved: where is it?
                    gone.append(_whereabouts(older))
            else:
                line = {"result_id": row.id, "status": row.status, "label": row.label, "recovered": True}
                recover.append(PlannedMove(row.id, path, text_path(row.stored_path), line, taken.identity))
    if gone:
        save_moves(factory, gone)
    return fresh, recover


def _whereabouts(row: Result) -> Move:
    """The Move of a recorded file whose name now holds other content: at its target (moved, the move not
    recorded), else replaced before it could be moved."""
    stored = text_path(row.stored_path)
    if os.path.lexists(stored):
        return Move(result_id=row.id, at=utcnow(), ok=True, path=row.stored_path, error=None)
    log.warning("image.replaced", path=row.original_path, result_id=row.id, stored=None)
    return Move(result_id=row.id, at=utcnow(), ok=False, path=row.stored_path, error=REPLACED)


def classify(
    batch: Sequence[Taken], predictor: Predictor, pool: ThreadPoolExecutor, *, max_pixels: int
) -> list[Outcome]:
    """Decode in the pool, then one predict call for every image that decoded. The outcomes no longer hold
    the files' bytes (only what is recorded), so that the caller can let them go."""

    def one(taken: Taken) -> NDArray[np.uint8] | ImageError:
        if taken.error is not None or taken.data is None:
            return taken.error or ImageError("unreadable", f"{taken.path} could not be read")
        try:
            return decode(taken.data, predictor.image_size, max_pixels=max_pixels, name=display(taken.path))
        except ImageError as exc:  # kept for its reason and message only: its traceback would hold the bytes
            return ImageError(exc.reason, str(exc.args[0]))

    decoded = list(pool.map(one, batch))
    good: dict[int, NDArray[np.uint8]] = {i: d for i, d in enumerate(decoded) if not isinstance(d, ImageError)}
    probabilities: dict[int, float] = {}
    if good:
        stack = np.stack(list(good.values())).astype(np.uint8)
        p = np.asarray(predictor.predict(stack), dtype=np.float32).reshape(-1)
        probabilities = {i: float(p[k]) for k, i in enumerate(good)}
    done = utcnow()
    outcomes = []
    for i, taken in enumerate(batch):
        d = decoded[i]
        error = d if isinstance(d, ImageError) else None
        outcomes.append(Outcome(replace(taken, data=None), done, probabilities.get(i), error))
    return outcomes


def shown_parts(path: Path, watch_dir: Path | None) -> list[str]:
    """``path`` below ``watch_dir`` (its name alone when it is not below it), each part as shown
    (histod.db.paths.display): the row's name is these joined with ``/``, the target keeps them as folders."""
    relative = path.relative_to(watch_dir) if watch_dir is not None and watch_dir in path.parents else Path(path.name)
    return [display(part) for part in relative.parts]


def to_result(outcome: Outcome, served: Served, host: str, stored: Path, name: str | None = None) -> Result:
    taken = outcome.taken
    ok = outcome.error is None and outcome.p is not None
    p = outcome.p if ok else None
    return Result(
        original_path=path_text(taken.path),
        name=name if name is not None else display(taken.path.name),
        sha256=taken.sha256,
        size_bytes=taken.size_bytes,
        received_at=taken.received_at,
        classified_at=outcome.classified_at,
        latency_ms=(outcome.classified_at - taken.received_at).total_seconds() * 1000,
        status=STATUS_CLASSIFIED if ok else STATUS_FAILED,
        label=(LABELS[1] if p >= served.threshold else LABELS[0]) if p is not None else None,
        p_malignant=p,
        threshold=served.threshold,
        model_id=served.model_id,
        model_sha256=served.sha256,
        run_id=served.run_id,
        engine=served.engine,
        error_reason=outcome.error.reason if outcome.error is not None else None,
        error=display(str(outcome.error.args[0])) if outcome.error is not None else None,
        host=host,
        stored_path=path_text(stored),
    )


def record(
    factory: sessionmaker[Session],
    outcomes: Sequence[Outcome],
    *,
    served: Served,
    host: str,
    processed_dir: Path,
    failed_dir: Path,
    claimed: set[Path],
    retries: Sequence[float] = RECORD_RETRIES,
    on_wait: Callable[[], None] | None = None,
    claims: Claims | None = None,
    watch_dir: Path | None = None,
) -> list[PlannedMove]:
    """One transaction: a row per outcome, each naming its unique target: ``<root>/YYYY-MM-DD/`` and the
    file's path below ``watch_dir`` (case folders are kept). Retried while the database is
    locked; raises DatabaseError when it stays unavailable (the files are then still in the watch folder).

    The write lock is taken first, so that targets are planned against every committed row, whichever service
    wrote it. With ``claims`` (several services on one database) the same transaction renews and locks this
    service's claims on the files; a file whose claim was taken over is left out (its new holder records it)."""
    for attempt in range(len(retries) + 1):
        try:
            with transaction(factory) as session:
                chain.lock_chain(session)
                mine = list(outcomes)
                if claims is not None:
                    held = claims.hold(session, [o.taken.path for o in outcomes])
                    mine = [o for o in outcomes if o.taken.path in held]
                    if not mine:
                        return []
                planned: list[tuple[Result, Path]] = []
                taken_here: set[Path] = set()

                def is_claimed(path: Path, s: Session = session, mine: set[Path] = taken_here) -> bool:
                    return path in claimed or path in mine or queries.stored_path_taken(s, path_text(path))

                for o in mine:
                    root = processed_dir if o.error is None and o.p is not None else failed_dir
                    parts = shown_parts(o.taken.path, watch_dir)
                    folder = dated_dir(root, o.taken.received_at)
                    target = plan_tree_target(folder, parts, is_claimed, pending=claimed | taken_here)
                    taken_here.add(target)
                    planned.append((to_result(o, served, host, target, "/".join(parts)), target))
                rows = queries.record_results(session, [r for r, _ in planned])
                moves = [
                    PlannedMove(row.id, o.taken.path, target, _line(row), o.taken.identity)
                    for row, o, (_, target) in zip(rows, mine, planned, strict=True)
                ]
            claimed.update(m.target for m in moves)
            return moves
        except DatabaseError as exc:
            if attempt == len(retries):
                raise
            log.warning("record.retry", attempt=attempt + 1, files=len(outcomes), error=str(exc))
            if claims is not None:
                claims.forget(o.taken.path for o in outcomes)  # the renewals were rolled back
            if on_wait is not None:
                on_wait()  # e.g. tell systemd's watchdog that the loop is alive, only waiting
            time.sleep(retries[attempt])
    raise AssertionError("unreachable")  # pragma: no cover


def _line(row: Result) -> dict[str, Any]:
    return {
        "result_id": row.id,
        "status": row.status,
        "label": row.label,
        "p": None if row.p_malignant is None else round(row.p_malignant, 4),
        "ms": round(row.latency_ms, 1),
        "reason": row.error_reason,
        "duplicate_of": row.duplicate_of,
    }


def move(planned: PlannedMove) -> Move:
    """Move one file; the outcome is a Move event (never raises for an OS error)."""
    target = path_text(planned.target)
    try:
        where = move_file(planned.source, planned.target, expect=planned.identity)
    except SourceReplacedError:
        return Move(result_id=planned.result_id, at=utcnow(), ok=False, path=target, error=REPLACED)
    except FileNotFoundError as exc:
        if exc.filename is not None and Path(exc.filename) == planned.source:
            return Move(result_id=planned.result_id, at=utcnow(), ok=False, path=target, error=VANISHED)
        return Move(result_id=planned.result_id, at=utcnow(), ok=False, path=target, error=display(str(exc)))
    except OSError as exc:
        return Move(result_id=planned.result_id, at=utcnow(), ok=False, path=target, error=display(str(exc)))
    return Move(result_id=planned.result_id, at=utcnow(), ok=True, path=path_text(where), error=None)


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
            keep = list(moves)
            if claims is not None:
                released = claims.release(session, [s for s in sources if s is not None])
                keep = [m for m, s in zip(moves, sources, strict=True) if s is None or s in released]
                if len(keep) < len(moves):
                    log.warning("moves.claim_lost", count=len(moves) - len(keep))
            queries.record_moves(session, keep)
    except DatabaseError as exc:
        log.warning("moves.not_recorded", count=len(moves), error=str(exc))
        return False
    return True


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
                continue  # still in the watch folder: intake moves it (or takes other content as a new event)
            there = os.path.lexists(stored)
            error = None if there else VANISHED  # neither here nor there: removed while the service was down
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
        log.warning("moves.not_recorded", count=len(found), error=str(exc))
        return 0
    if keep:
        log.info("moves.settled", count=len(keep))
    return len(keep)


def settle_claimed(factory: sessionmaker[Session], paths: Sequence[Path], claims: Claims) -> int:
    """Claims taken over from a service that died, on files no longer in the watch folder: record the move of
    a result whose file is at its target (the service moved it, then died before saving the move), then delete
    the claims. Returns the moves recorded. Raises DatabaseError."""
    with transaction(factory) as session:
        chain.lock_chain(session)
        held = claims.hold(session, paths)
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
