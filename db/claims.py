"""The statements on the ``claims`` table (see histod.daemon.claims for when they are used). Functions take a
Session; the caller owns the transaction. Every time is seconds since the epoch by the DATABASE's clock
(:func:`db_now`), never a service's, so that hosts whose clocks disagree still agree on what has expired.

Row locks are taken in path order (an ``ORDER BY path ... FOR UPDATE`` sub-select, the ``VALUES`` of an insert
sorted), so that two services working on overlapping sets of claims cannot deadlock each other."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Float, Select, case, cast, delete, extract, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.sql.elements import ColumnElement

from histod.db.models import Claim

_UNIX_EPOCH_JULIAN = 2440587.5


def db_now(dialect: str) -> ColumnElement[float]:
    """The database's wall clock, in seconds since the epoch (PostgreSQL: at the statement, not the transaction
    start; SQLite: julianday('now'), to the millisecond)."""
    if dialect == "postgresql":
        return cast(extract("epoch", func.clock_timestamp()), Float)
    return cast((func.julianday("now") - _UNIX_EPOCH_JULIAN) * 86400.0, Float)


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _upsert(dialect: str, rows: list[dict[str, Any]], now: ColumnElement[float]) -> ReturningInsert[tuple[str, Any]]:
    """INSERT ... ON CONFLICT (path) DO UPDATE (both dialects spell it alike): renew when the row is the same
    worker's, take it over when it has expired, else leave it (and return nothing for it)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(Claim).values(rows)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(Claim).values(rows)
    new = stmt.excluded
    mine = Claim.worker == new.worker
    upsert = stmt.on_conflict_do_update(
        index_elements=[Claim.path],
        set_={
            "worker": new.worker,
            "claimed_at": case((mine, Claim.claimed_at), else_=new.claimed_at),
            "expires_at": new.expires_at,
            "taken_from": case((mine, None), else_=Claim.worker),
        },
        where=or_(mine, Claim.expires_at < now),
    )
    returning: ReturningInsert[tuple[str, Any]] = upsert.returning(Claim.path, Claim.taken_from)
    return returning


def take(session: Session, paths: Iterable[str], worker: str, expiry_s: float) -> dict[str, str | None]:
    """Claim ``paths`` for ``worker``: a path no one claims is inserted; a claim of ``worker`` is renewed; a claim
    of another worker is taken over only once it has expired. Returns the paths ``worker`` now holds, each with
    the worker it was taken from (None unless this call took an expired claim over)."""
    wanted = sorted(set(paths))
    if not wanted:
        return {}
    dialect = _dialect(session)
    now = db_now(dialect)
    rows = [
        {"path": p, "worker": worker, "claimed_at": now, "expires_at": now + expiry_s, "taken_from": None}
        for p in wanted
    ]
    return {str(path): taken_from for path, taken_from in session.execute(_upsert(dialect, rows, now))}


def _locked(worker: str, paths: Iterable[str] | None) -> Select[Any]:
    query = select(Claim.path).where(Claim.worker == worker)
    if paths is not None:
        query = query.where(Claim.path.in_(sorted(set(paths))))
    return query.order_by(Claim.path).with_for_update()


def hold(session: Session, worker: str, expiry_s: float, paths: Iterable[str] | None = None) -> set[str]:
    """Renew the claims ``worker`` still holds among ``paths`` (all of them when None), locking their rows
    for the rest of the transaction (a takeover waits, then finds them renewed). Returns those paths: the others
    were taken over (or released) and are no longer this worker's to record or move."""
    now = db_now(_dialect(session))
    stmt = (
        update(Claim)
        .where(Claim.path.in_(_locked(worker, paths).scalar_subquery()))
        .values(expires_at=now + expiry_s)
        .returning(Claim.path)
        .execution_options(synchronize_session=False)
    )
    return {str(p) for p in session.scalars(stmt)}


def release(session: Session, worker: str, paths: Iterable[str] | None = None) -> set[str]:
    """Delete ``worker``'s claims on ``paths`` (all of them when None); returns the paths it still held."""
    stmt = (
        delete(Claim)
        .where(Claim.path.in_(_locked(worker, paths).scalar_subquery()))
        .returning(Claim.path)
        .execution_options(synchronize_session=False)
    )
    return {str(p) for p in session.scalars(stmt)}


def expired(session: Session, limit: int = 100) -> list[str]:
    """Paths whose claim has expired (its holder stopped renewing it), the longest expired first."""
    now = db_now(_dialect(session))
    query = select(Claim.path).where(Claim.expires_at < now).order_by(Claim.expires_at).limit(limit)
    return [str(p) for p in session.scalars(query)]


def claimed(session: Session, paths: Iterable[str]) -> set[str]:
    """Which of ``paths`` have a claim row (live or expired): some service is, or was, working on them."""
    wanted = sorted(set(paths))
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        found.update(str(p) for p in session.scalars(select(Claim.path).where(Claim.path.in_(chunk))))
    return found


def holders(session: Session) -> dict[str, int]:
    """How many claims each worker holds (for logs and tests)."""
    rows = session.execute(select(Claim.worker, func.count()).group_by(Claim.worker))
    return {str(worker): int(n) for worker, n in rows}
