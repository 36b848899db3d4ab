"""The results database: SQLAlchemy 2.0 typed tables.

Rows are events and are never updated: a result row is written once, in the transaction that records its
batch, with everything known about it (including where its file is to be moved). What happens to the file
afterwards is another event, a :class:`Move` row. Since revision 0002 the database enforces this: triggers
reject UPDATE and DELETE on all four tables (and on ``tiles``, added by revision 0005). Since revision 0004
every row of the audit tables is a link of one hash chain (:class:`Chained`: ``chain_seq``, ``prev_hash``,
``row_hash``, ``row_mac``; see histod.db.chain). A correction is a new ``review`` row that names the row it amends.

Timestamps are timezone-aware UTC in Python; they are stored as naive UTC (portable across SQLite and
PostgreSQL) by :class:`UTCDateTime`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

STATUS_CLASSIFIED = "classified"
STATUS_FAILED = "failed"
STATUS_REVIEWED = "reviewed"
STATUSES = (STATUS_CLASSIFIED, STATUS_FAILED, STATUS_REVIEWED)

MOVE_VANISHED = "source vanished"
"""the error of a Move whose file disappeared before it could be moved (final: nothing to retry)"""
MOVE_REPLACED = "source replaced"
"""the error of a Move whose file was replaced by other content (another inode, size or mtime) after it was read
(final: the new content is a new event, with its own row)"""
FINAL_MOVE_ERRORS = (MOVE_VANISHED, MOVE_REPLACED)

KIND_CLASSIFICATION = "classification"
"""a row the service wrote for an image event"""
KIND_REVIEW = "review"
"""a row a person wrote (``histod audit review``) that amends an earlier row; it never replaces it"""
KINDS = (KIND_CLASSIFICATION, KIND_REVIEW)

# Stable constraint names, so that migrations (and batch mode on SQLite) can refer to them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Chained:
    """The columns that make a row a link of the audit chain (histod.db.chain): results, moves, reports and
    models rows form ONE chain, in the order they were appended."""

    chain_seq: Mapped[int] = mapped_column(Integer, unique=True)
    """the row's position in the chain (1, 2, ... across the audit tables)"""
    prev_hash: Mapped[str] = mapped_column(String(64))
    """row_hash of the row before it in the chain (histod.db.chain.GENESIS for the first)"""
    row_hash: Mapped[str] = mapped_column(String(64))
    """sha256 over prev_hash and this row's content (histod.db.chain.link_hash)"""
    row_mac: Mapped[str | None] = mapped_column(String(64))
    """HMAC-SHA256 of row_hash under the audit key, when the writer had one (histod.db.chain.mac)"""


class ModelRecord(Chained, Base):
    """One model file the service has served (registered once per distinct sha256)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    run_id: Mapped[str] = mapped_column(String(200))
    run_path: Mapped[str] = mapped_column(Text)
    engine: Mapped[str] = mapped_column(String(20))
    image_size: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    split_sha256: Mapped[str | None] = mapped_column(String(64))
    """sha256 of the run's split.csv (which patients trained, which validated); None when the run has none"""


class Result(Chained, Base):
    """One image event: a file taken from the watch folder and classified (or not, with the reason)."""

    __tablename__ = "results"
    __table_args__ = (
        Index("ix_results_sha256", "sha256"),
        Index("ix_results_original_path", "original_path"),
        Index("ix_results_received_at", "received_at"),
        Index("ix_results_status_label", "status", "label"),
        # one classification per target path; review rows repeat the path of the row they amend
        Index(
            "uq_results_stored_path",
            "stored_path",
            unique=True,
            sqlite_where=text("kind = 'classification'"),
            postgresql_where=text("kind = 'classification'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    original_path: Mapped[str] = mapped_column(Text)
    """where the file was found (histod.db.paths.path_text: lossless for names that are not UTF-8)"""
    name: Mapped[str] = mapped_column(Text)
    """its path below the watch folder, as shown (``case17/a.png``; the file name for a file at the top): the
    stored file keeps it below ``processed/`` or ``failed/YYYY-MM-DD/``"""
    sha256: Mapped[str | None] = mapped_column(String(64))
    """of the bytes classified; None when the file could not be read at all (FIFO, symlink, no permission)"""
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    classified_at: Mapped[datetime] = mapped_column(UTCDateTime)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(20))
    label: Mapped[str | None] = mapped_column(String(40))
    p_malignant: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(String(200))
    engine: Mapped[str | None] = mapped_column(String(20))
    error_reason: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str] = mapped_column(String(255))
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    """the first result with the same sha256, when this content was seen before"""
    stored_path: Mapped[str] = mapped_column(Text)
    """where the file is moved after this row is committed (see Move for where it actually went)"""
    kind: Mapped[str] = mapped_column(String(20), default=KIND_CLASSIFICATION, server_default=KIND_CLASSIFICATION)
    amends_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    """for a review: the row it amends (which stays as it was)"""
    reviewer: Mapped[str | None] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 over prev_hash and this row's content (histod.db.chain.link_hash)"""

    model: Mapped[ModelRecord | None] = relationship(lazy="raise")


class Move(Chained, Base):
    """What happened to a result's file after the result was committed: moved, or a failed attempt."""

    __tablename__ = "moves"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ok: Mapped[bool] = mapped_column(Boolean)
    path: Mapped[str] = mapped_column(Text)
    """where the file now is (ok) or was meant to go (not ok)"""
    error: Mapped[str | None] = mapped_column(Text)


class Report(Chained, Base):
    """A periodic summary written by the service (also written as JSON into reports/)."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    total: Mapped[int] = mapped_column(Integer)
    classified: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    benign: Mapped[int] = mapped_column(Integer)
    malignant: Mapped[int] = mapped_column(Integer)
    duplicates: Mapped[int] = mapped_column(Integer)
    mean_p: Mapped[float | None] = mapped_column(Float)
    median_p: Mapped[float | None] = mapped_column(Float)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    throughput_per_s: Mapped[float | None] = mapped_column(Float)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)
    """the full summary as printed by `histod report --json`"""


class TileSet(Chained, Base):
    """How a results row's image met the model's scale: the tiles of a tiled image (a field or a whole slide:
    its aggregation rule, tile counts, malignant area and every tissue tile's position and p, packed in
    ``data``), or only the scale warnings of an image classified whole. At most one per result, written in the
    transaction of its results row. ``data`` is not hashed into the chain; its ``data_sha256`` is, and
    `histod audit verify` recomputes it."""

    __tablename__ = "tiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), unique=True)
    rule: Mapped[str | None] = mapped_column(String(40))
    """the aggregation rule (``topk0.1>=0.67``); None for an image classified whole"""
    rule_cut: Mapped[float | None] = mapped_column(Float)
    """the cut the rule's score is compared with (the result's ``threshold``)"""
    tile_threshold: Mapped[float | None] = mapped_column(Float)
    """the model's threshold, applied to each tile's p (malignant tiles and area)"""
    grid_tiles: Mapped[int] = mapped_column(Integer)
    tissue_tiles: Mapped[int] = mapped_column(Integer)
    malignant_tiles: Mapped[int] = mapped_column(Integer)
    malignant_share: Mapped[float | None] = mapped_column(Float)
    """the share of the tissue area in malignant tiles"""
    malignant_area_px: Mapped[float | None] = mapped_column(Float)
    """that area in level-0 pixels"""
    malignant_area_mm2: Mapped[float | None] = mapped_column(Float)
    """that area in mm² (when the image declares its microns per pixel)"""
    tile_px: Mapped[float | None] = mapped_column(Float)
    """a tile's side in level-0 pixels"""
    level: Mapped[int | None] = mapped_column(Integer)
    mpp: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    backend: Mapped[str | None] = mapped_column(String(20))
    """``image`` (decoded whole) or ``openslide`` (read block by block)"""
    warnings: Mapped[list[str]] = mapped_column(JSON)
    """where the image's scale did not match the model's (``coarser_than_model: ...``); empty when it did"""
    seconds: Mapped[float | None] = mapped_column(Float)
    """time to classify the tiles"""
    data_sha256: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    """one little-endian record per tissue tile: x int32, y int32 (level-0 px), p float32, tissue share float32
    (histod.tiling.TILE_RECORD)"""


class Claim(Base):
    """Operational state, not audit: which service is working on a file of the shared watch folder. Used only
    when several services share one PostgreSQL database (histod.daemon.claims). A row lives from the moment a
    service takes the file until its move is recorded (the same transaction deletes it); a row whose
    ``expires_at`` has passed belongs to a service that stopped renewing it and may be taken over. Unlike the
    audit tables, rows here are updated and deleted."""

    __tablename__ = "claims"
    __table_args__ = (Index("ix_claims_expires_at", "expires_at"), Index("ix_claims_worker", "worker"))

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    """the file's absolute path in the watch folder (the same on every host: mount the share at one path)"""
    worker: Mapped[str] = mapped_column(String(255))
    """the holder: ``worker_id/nonce`` (a fresh nonce per start, so a restarted process never inherits)"""
    claimed_at: Mapped[float] = mapped_column(Float)
    """seconds since the epoch, by the database's clock"""
    expires_at: Mapped[float] = mapped_column(Float)
    """seconds since the epoch, by the database's clock: renewed by the holder's heartbeat"""
    taken_from: Mapped[str | None] = mapped_column(String(255))
    """the worker whose expired claim this one took over (None for a fresh claim)"""
