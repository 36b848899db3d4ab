"""`histod audit verify`: walk the one audit chain (results, moves, reports, models and tiles rows, by chain_seq) and
report the first place where it does not hold. One small check per kind of break:

- :func:`check_values`: a value of the wrong type (a blob for a name, text for a number, a timestamp that is not
  one) or NULL where a value is required: the row was changed behind the database's types;
- :func:`check_order`: chain positions repeated or out of id order;
- :func:`check_link`: ``prev_hash`` is not the previous row's hash (a row is missing, inserted or reordered);
- :func:`check_content`: the content does not give ``row_hash`` (the row was changed);
- :func:`check_mac`: with the key: a MAC that does not match, or a row without one after keyed rows;
- :func:`check_sealed`: with the key: the chain's last row carries no MAC (MACs removed, or rows appended
  without the key);
- :func:`check_anchors`: a hash published earlier is no longer in the chain (rows cut off or the chain rebuilt);
- :func:`check_tile_data`: a tiles row's packed tiles no longer give its ``data_sha256`` (the hashed column
  that stands for them in the chain), or it names a result that is gone;
- :func:`check_moves_name_results`, :func:`check_results_name_models`: references to rows that are gone.

Values are read as the database driver gives them, without SQLAlchemy's type processing, so that a tampered
value is reported as a broken row, never raised as a traceback.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, inspect, select, type_coerce
from sqlalchemy.orm import Session
from sqlalchemy.types import NullType

from histod.db import chain
from histod.db.models import ModelRecord, Move, Result, TileSet
from histod.logs import printable

_HEX64 = re.compile(r"[0-9a-f]{64}")
_LINK = ("chain_seq", "prev_hash", "row_hash", "row_mac")


@dataclass(frozen=True)
class Break:
    """The first place where the chain does not hold."""

    table: str
    id: Any
    problem: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.table} row {self.id}: {self.problem}\n  expected {self.expected}\n  found    {self.found}"


@dataclass(frozen=True)
class Verdict:
    counts: dict[str, int]
    """rows walked per table (up to and including a break)"""
    first_hash: str | None
    last_hash: str | None
    keyed: int
    """rows that carry a MAC"""
    key_checked: bool
    broken: Break | None

    @property
    def ok(self) -> bool:
        return self.broken is None

    @property
    def rows(self) -> int:
        """results rows walked"""
        return self.counts.get("results", 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class BrokenChainError(Exception):
    def __init__(self, found: Break) -> None:
        super().__init__(str(found))
        self.found = found


def _shown(value: Any) -> str:
    return printable(repr(value))


# --- reading -----------------------------------------------------------------------------------------------
def _raw_rows(connection: Connection, table: str, page: int) -> Iterator[dict[str, Any]]:
    """The rows of ``table`` by id, as the driver gives them (no type processing)."""
    t: Table = chain.CHAINED[table].__table__  # type: ignore[attr-defined]
    names = ("id", *chain.FIELDS[table][1:], *_LINK)
    columns = [type_coerce(t.c[name], NullType()).label(name) for name in names]
    after: Any = None
    while True:
        query = select(*columns).order_by(t.c.id).limit(page)
        if after is not None:
            query = query.where(t.c.id > after)
        rows = [dict(r._mapping) for r in connection.execute(query)]
        if not rows:
            return
        yield from rows
        after = rows[-1]["id"]


def _positioned(connection: Connection, table: str, page: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
    for row in _raw_rows(connection, table, page):
        seq = row["chain_seq"]
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise BrokenChainError(
                Break(table, row["id"], "chain_seq is not a position in the chain", "an integer", _shown(seq))
            )
        yield seq, table, row


def chain_rows(connection: Connection, page: int = 2000) -> Iterator[tuple[str, dict[str, Any]]]:
    """(table, raw row) for every row of the audit tables, in chain order."""
    present = set(inspect(connection).get_table_names())  # a database at an older revision lacks the newer tables
    streams = [_positioned(connection, table, page) for table in chain.CHAINED if table in present]
    for _seq, table, row in heapq.merge(*streams, key=lambda item: item[0]):
        yield table, row


# --- the checks, one per kind of break ---------------------------------------------------------------------
_EXPECTED = {
    "text": "text",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean (0 or 1)",
    "time": "a timestamp",
    "json": "JSON",
}


def _typed(kind: str, value: Any) -> Any:
    """``value`` as the driver gave it, as the Python value it was hashed from; ValueError when it is not one."""
    if kind == "text" and isinstance(value, str):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "bool" and (isinstance(value, bool) or value in (0, 1)):
        return bool(value)
    if kind == "time":
        if isinstance(value, datetime):
            return value
        if isinstance(value, str):
            return datetime.fromisoformat(value)
    if kind == "json":
        if isinstance(value, str):
            return json.loads(value)
        if value is None or isinstance(value, dict | list | str | int | float | bool):  # decoded by the driver
            return value
    raise ValueError  # the problem names what was expected


def check_values(table: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The row's hashed values, typed; BrokenChainError for a value of the wrong type or NULL where one is required, and
    for link columns that are not hashes."""
    typed = typed_values(table, raw)
    for name in ("prev_hash", "row_hash"):
        if not isinstance(raw[name], str) or not _HEX64.fullmatch(raw[name]):
            raise BrokenChainError(Break(table, raw["id"], f"{name} is not a hash", "64 hex digits", _shown(raw[name])))
    if raw["row_mac"] is not None and (not isinstance(raw["row_mac"], str) or not _HEX64.fullmatch(raw["row_mac"])):
        raise BrokenChainError(
            Break(table, raw["id"], "row_mac is not a MAC", "64 hex digits or NULL", _shown(raw["row_mac"]))
        )
    return typed


def typed_values(table: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The hashed values of a raw ``table`` row as the Python values they were hashed from; BrokenChainError for a value
    of the wrong type or NULL where one is required."""
    columns = chain.CHAINED[table].__table__.c  # type: ignore[attr-defined]
    typed: dict[str, Any] = {}
    for name in chain.FIELDS[table]:
        value, kind = raw[name], chain.KINDS[table][name]
        if value is None:
            if not columns[name].nullable:
                raise BrokenChainError(
                    Break(table, raw["id"], f"{name} is NULL where a value is required", "a value", "NULL")
                )
            typed[name] = None
            continue
        try:
            typed[name] = _typed(kind, value)
        except (ValueError, TypeError) as exc:
            what = "a blob" if isinstance(value, bytes) else _shown(value)
            detail = f" ({printable(str(exc))})" if str(exc) else ""
            raise BrokenChainError(
                Break(table, raw["id"], f"{name} is not {_EXPECTED[kind]}{detail}", _EXPECTED[kind], what)
            ) from exc
    return typed


def check_order(table: str, raw: dict[str, Any], last_seq: int, last_in_table: dict[str, int]) -> None:
    """Positions strictly increase along the chain, and with the id within a table."""
    seq = int(raw["chain_seq"])
    if seq <= last_seq:
        raise BrokenChainError(
            Break(table, raw["id"], "chain_seq repeats an earlier position", f"> {last_seq}", str(seq))
        )
    if seq <= last_in_table.get(table, 0):
        raise BrokenChainError(
            Break(table, raw["id"], "chain_seq is out of id order", f"> {last_in_table[table]}", str(seq))
        )
    last_in_table[table] = seq


def check_link(table: str, raw: dict[str, Any], prev: str) -> None:
    if raw["prev_hash"] != prev:
        raise BrokenChainError(
            Break(
                table,
                raw["id"],
                "prev_hash does not link to the row before it (a row is missing or was re-hashed)",
                prev,
                str(raw["prev_hash"]),
            )
        )


def check_content(table: str, raw: dict[str, Any], typed: dict[str, Any], prev: str) -> str:
    """The row's hash, recomputed; BrokenChainError when it is not the stored one."""
    try:
        computed = chain.link_hash(table, prev, typed)
    except (TypeError, ValueError) as exc:  # a JSON value that cannot be serialized again
        raise BrokenChainError(
            Break(table, raw["id"], f"a value cannot be hashed ({exc})", "hashable values", "?")
        ) from exc
    if raw["row_hash"] != computed:
        raise BrokenChainError(
            Break(table, raw["id"], "content does not match row_hash (the row was changed)", computed, raw["row_hash"])
        )
    return computed


def check_mac(table: str, raw: dict[str, Any], key: bytes, keyed_before: bool) -> bool:
    """With the key: a MAC present must match; once a row is keyed, every later one must be. True when keyed."""
    if raw["row_mac"] is None:
        if keyed_before:
            raise BrokenChainError(
                Break(
                    table,
                    raw["id"],
                    "no MAC after keyed rows (written without the key, or its MAC was removed)",
                    "a MAC",
                    "NULL",
                )
            )
        return False
    expected = chain.mac(key, raw["row_hash"])
    if raw["row_mac"] != expected:
        raise BrokenChainError(
            Break(
                table,
                raw["id"],
                "row_mac does not match (the chain was rewritten without the key, or another key is given)",
                expected,
                raw["row_mac"],
            )
        )
    return True


def check_sealed(last: tuple[str, Any] | None, last_keyed: bool) -> None:
    """With the key: the chain's last row must carry a MAC, which vouches for every row before it."""
    if last is not None and not last_keyed:
        raise BrokenChainError(
            Break(
                last[0],
                last[1],
                "the last row of the chain has no MAC, so nothing vouches for the chain (MACs removed, or rows "
                "appended without the key)",
                "a MAC",
                "NULL",
            )
        )


def check_anchors(wanted: set[str], seen: set[str], last: tuple[str, Any] | None, last_hash: str | None) -> None:
    missing = sorted(wanted - seen)
    if missing:
        table, row_id = last if last is not None else ("results", 0)
        raise BrokenChainError(
            Break(
                table,
                row_id,
                "an anchor hash is not in the chain (rows were removed or the chain was rebuilt)",
                missing[0],
                str(last_hash),
            )
        )


def check_moves_name_results(session: Session) -> None:
    _check_names_results(session, cast(Table, Move.__table__))


def _check_names_results(session: Session, t: Table) -> None:
    """Every row of ``t`` (moves, tiles) names a results row that exists."""
    orphan = session.execute(
        select(t.c.id, t.c.result_id)
        .where(~select(Result.id).where(Result.id == t.c.result_id).exists())
        .order_by(t.c.id)
        .limit(1)
    ).first()
    if orphan is not None:
        raise BrokenChainError(
            Break(t.name, orphan[0], "names a result that is missing", f"results row {orphan[1]}", "no such row")
        )


def check_tile_data(session: Session, page: int = 200) -> None:
    """Each tiles row's ``data`` gives its ``data_sha256`` (NULL with NULL), and its result exists."""
    if not inspect(session.connection()).has_table("tiles"):
        return
    t = cast(Table, TileSet.__table__)
    raw = type_coerce(t.c.data, NullType()).label("data")
    after = 0
    while True:
        rows = session.execute(
            select(t.c.id, t.c.data_sha256, raw).where(t.c.id > after).order_by(t.c.id).limit(page)
        ).all()
        if not rows:
            break
        for row_id, stored, data in rows:
            blob = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else data
            if blob is not None and not isinstance(blob, bytes):
                raise BrokenChainError(Break("tiles", row_id, "data is not a blob", "a blob", _shown(blob)))
            computed = None if blob is None else hashlib.sha256(blob).hexdigest()
            if computed != stored:
                raise BrokenChainError(
                    Break(
                        "tiles",
                        row_id,
                        "data does not match data_sha256 (the packed tiles were changed)",
                        str(stored),
                        str(computed),
                    )
                )
        after = rows[-1][0]
    _check_names_results(session, t)


def check_results_name_models(session: Session) -> None:
    unknown = session.execute(
        select(Result.id, Result.model_id)
        .where(Result.model_id.is_not(None), ~select(ModelRecord.id).where(ModelRecord.id == Result.model_id).exists())
        .order_by(Result.id)
        .limit(1)
    ).first()
    if unknown is not None:
        raise BrokenChainError(
            Break("results", unknown[0], "names a model that is missing", f"models row {unknown[1]}", "no such row")
        )


# --- the walk ----------------------------------------------------------------------------------------------
@dataclass
class _Walk:
    wanted: set[str]
    key: bytes | None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(chain.CHAINED, 0))
    prev: str = chain.GENESIS
    first: str | None = None
    last: tuple[str, Any] | None = None
    last_seq: int = 0
    in_table: dict[str, int] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    keyed: int = 0
    last_keyed: bool = False

    def step(self, table: str, raw: dict[str, Any]) -> None:
        self.counts[table] += 1
        self.last = (table, raw["id"])
        typed = check_values(table, raw)
        check_order(table, raw, self.last_seq, self.in_table)
        self.last_seq = int(raw["chain_seq"])
        check_link(table, raw, self.prev)
        computed = check_content(table, raw, typed, self.prev)
        self.keyed += raw["row_mac"] is not None
        if self.key is not None:
            self.last_keyed = check_mac(table, raw, self.key, self.last_keyed)
        if computed in self.wanted:
            self.seen.add(computed)
        self.first = self.first or computed
        self.prev = computed


def verify(session: Session, *, anchors: Iterable[str] = (), key: bytes | None = None, page: int = 2000) -> Verdict:
    """Walk the chain and recompute every link; stop at the first break. Then (with ``key``) check that the last
    row is keyed, that every ``anchors`` hash (a last hash published earlier, e.g. in an export manifest) is still
    in the chain (rows removed from the end leave an intact but shorter chain), and the references between
    tables."""
    walk = _Walk(set(anchors), key)
    broken: Break | None = None
    try:
        for table, raw in chain_rows(session.connection(), page):
            walk.step(table, raw)
        last_hash = walk.prev if walk.last is not None else None
        if key is not None:
            check_sealed(walk.last, walk.last_keyed)
        check_anchors(walk.wanted, walk.seen, walk.last, last_hash)
        check_moves_name_results(session)
        check_results_name_models(session)
        check_tile_data(session)
    except BrokenChainError as exc:
        broken = exc.found
    return Verdict(
        counts=walk.counts,
        first_hash=walk.first,
        last_hash=walk.prev if walk.last is not None else None,
        keyed=walk.keyed,
        key_checked=key is not None,
        broken=broken,
    )
