"""Claims: how several services sharing one PostgreSQL database (and one watch folder) classify each file once.

Every service sees every file. Before it reads one, a service CLAIMS it (:meth:`Claims.claim`): it inserts a row
keyed on the file's path into ``claims`` (histod.db.claims.take). A path has at most one row, so one service wins;
the others drop the file. The holder then works as a lone service would, with three checks against the database:

* record: the transaction that inserts the file's result first renews the holder's claim on it, locking the
  claim row (histod.db.claims.hold). A file whose claim is no longer the service's is not recorded.
* move: the file is moved only while the claim was confirmed less than half an expiry ago (else it is confirmed
  again first, and a lost claim means: leave the file to its new holder).
* moved: the transaction that saves the file's ``moves`` row deletes its claim; a move whose claim is no
  longer the service's is not saved (its new holder records it).

A claim expires ``claim_expiry_s`` after it was last renewed, by the database's clock. The holder renews all
of its claims every ``claim_heartbeat_s`` (:meth:`Claims.beat`). A service that died stops renewing; the next
heartbeat of any other service finds its expired claims (histod.db.claims.expired) and takes them over: a file
still in the watch folder is processed again (its result, if committed, is found by the record stage and the
file is only moved), a file already moved gets its missing ``moves`` row (:func:`histod.daemon.record.settle_claimed`).

A service's identity in the table is ``worker_id`` (default ``host:pid``) plus a random nonce per start, so a
process restarted with the same pid (a container) never mistakes a dead predecessor's claims for its own.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from histod.db import claims as sql
from histod.db.paths import path_text, text_path
from histod.db.session import reading, transaction
from histod.errors import DatabaseError
from histod.logs import get_logger

log: Any = get_logger("histod.claims")

SWEEP_LIMIT = 256
"""expired claims taken over per heartbeat at most"""


class Claims:
    """One service's claims: taking, confirming, releasing, and the heartbeat that renews them and takes over
    the expired claims of others. Each method that talks to the database raises DatabaseError."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        worker_id: str,
        expiry_s: float,
        heartbeat_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory
        self.worker = f"{worker_id}/{secrets.token_hex(3)}"
        self.expiry_s = expiry_s
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.confirmed: dict[Path, float] = {}
        """held paths -> local (monotonic) time just BEFORE the statement that last took or renewed the claim"""
        self.next_beat = 0.0
        self.taken_over = 0

    # --- in a transaction of its own -----------------------------------------------------------------
    def claim(self, paths: Iterable[Path]) -> set[Path]:
        """Claim ``paths``; returns the ones this service holds now (the others are another service's)."""
        return set(self._claim(paths))

    def _claim(self, paths: Iterable[Path]) -> dict[Path, str | None]:
        """Held paths, each with the worker it was taken over from (None: a fresh or renewed claim)."""
        wanted = list(dict.fromkeys(paths))
        if not wanted:
            return {}
        at = self.clock()
        with transaction(self.factory) as session:
            got = sql.take(session, (path_text(p) for p in wanted), self.worker, self.expiry_s)
        held = {text_path(p): previous for p, previous in got.items()}
        for path, previous in held.items():
            self.confirmed[path] = at
            if previous is not None:
                self.taken_over += 1
                log.warning("claim.taken_over", path=path_text(path), previous=previous, worker=self.worker)
        others = len(wanted) - len(held)
        if others:
            log.debug("claim.held_elsewhere", files=others, worker=self.worker)
        return held

    def ensure(self, paths: Sequence[Path]) -> set[Path]:
        """The ``paths`` this service may still move: those confirmed less than half an expiry ago, and the
        others once renewed in the database (a claim taken over meanwhile is dropped)."""
        now = self.clock()
        stale = [p for p in paths if now - self.confirmed.get(p, -self.expiry_s) >= self.expiry_s / 2]
        if stale:
            with transaction(self.factory) as session:
                self.hold(session, stale)
        return {p for p in paths if p in self.confirmed}

    def release_all(self) -> int:
        """At a clean stop: give every claim back, so that another service (or this one, restarted) takes the
        files at once instead of after the expiry."""
        with transaction(self.factory) as session:
            gone = sql.release(session, self.worker)
        self.confirmed.clear()
        return len(gone)

    def beat(self) -> list[Path]:
        """Once per heartbeat: renew every claim of this service, then take over up to SWEEP_LIMIT expired claims
        of others. Returns the paths taken over (the caller processes or settles them)."""
        if self.clock() < self.next_beat:
            return []
        self.next_beat = self.clock() + self.heartbeat_s
        at = self.clock()
        with transaction(self.factory) as session:
            renewed = {text_path(p) for p in sql.hold(session, self.worker, self.expiry_s)}
        lost = [p for p in self.confirmed if p not in renewed]
        for path in lost:
            log.warning("claim.lost", path=path_text(path), worker=self.worker)
            del self.confirmed[path]
        for path in renewed:
            self.confirmed[path] = at
        with reading(self.factory) as session:
            expired = sql.expired(session, SWEEP_LIMIT)
        if not expired:
            return []
        # only claims of others: an own claim that expired (a late heartbeat) was just renewed, and its file is
        # still in this service's hands (a queued arrival, a move to retry)
        return sorted(p for p, previous in self._claim(text_path(p) for p in expired).items() if previous is not None)

    # --- inside the caller's transaction -------------------------------------------------------------
    def hold(self, session: Session, paths: Sequence[Path]) -> set[Path]:
        """Renew and lock this service's claims on ``paths``; returns those it still holds (see module doc)."""
        at = self.clock()
        held = {text_path(p) for p in sql.hold(session, self.worker, self.expiry_s, (path_text(p) for p in paths))}
        for path in paths:
            if path in held:
                self.confirmed[path] = at
            else:
                self.confirmed.pop(path, None)
                log.warning("claim.lost", path=path_text(path), worker=self.worker)
        return held

    def release(self, session: Session, paths: Sequence[Path]) -> set[Path]:
        """Delete this service's claims on ``paths``; returns those it still held."""
        if not paths:
            return set()
        gone = {text_path(p) for p in sql.release(session, self.worker, (path_text(p) for p in paths))}
        for path in paths:
            self.confirmed.pop(path, None)
        return gone

    def forget(self, paths: Iterable[Path]) -> None:
        """Drop local bookkeeping for ``paths`` (a batch the database refused: its claims will be taken again)."""
        for path in paths:
            self.confirmed.pop(path, None)

    def release_quietly(self, paths: Sequence[Path]) -> None:
        """Give back the claims on files that vanished before they were read; a refusal only leaves the rows to
        expire (and to be swept)."""
        if not paths:
            return
        try:
            with transaction(self.factory) as session:
                self.release(session, paths)
        except DatabaseError as exc:
            log.warning("claims.release_failed", files=len(paths), error=str(exc))
