"""Alembic migrations for the results database, applied programmatically (``upgrade head``) at start.

The scripts ship inside the package (``histod.db.migrations``), so an installed histod migrates without the
repository. For a new revision during development::

    .venv/bin/alembic -c db/alembic.ini revision --autogenerate -m "what changed"
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from histod.errors import DatabaseError

SCRIPT_LOCATION = Path(__file__).resolve().parent
_LOCK = threading.Lock()
"""Alembic's command API keeps its context in module globals: one migration at a time per process."""
MIGRATION_LOCK_KEY = 0x48_49_53_54_4D_47  # "HISTMG": the PostgreSQL advisory lock held around `upgrade`


def alembic_config(engine: Engine | None = None) -> object:
    """An Alembic Config pointing at the packaged scripts; ``engine`` is handed to env.py."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    if engine is not None:
        config.attributes["engine"] = engine
        config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema at ``engine`` to ``revision``; idempotent. Raises DatabaseError."""
    if revision == "head" and at_declared_head(engine):
        return  # the common case: nothing to do, and neither Alembic nor the scripts are imported
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    if revision == "head" and current_revision(engine) == head_revision():
        return
    config = alembic_config(engine)
    assert isinstance(config, Config)
    with _LOCK, _across_processes(engine):
        if revision == "head" and current_revision(engine) == head_revision():
            return  # another service migrated while this one waited for the lock
        try:
            command.upgrade(config, revision)
        except (SQLAlchemyError, CommandError, OSError) as exc:
            raise DatabaseError(f"cannot migrate the database {engine.url!r}: {exc}") from exc


@contextmanager
def _across_processes(engine: Engine) -> Iterator[None]:
    """PostgreSQL: hold a session-level advisory lock (on a connection of its own) while migrating, so that
    services starting together migrate one after the other; the others then find the schema at head. SQLite
    needs nothing: env.py runs the migrations in one BEGIN IMMEDIATE transaction, under the database's write
    lock."""
    if engine.dialect.name != "postgresql":
        yield
        return
    try:
        connection = engine.connect()
        connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
        connection.commit()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot take the migration lock on {engine.url!r}: {exc}") from exc
    try:
        yield
    finally:
        try:
            connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
            connection.commit()
        except SQLAlchemyError:
            connection.invalidate()  # closing the session releases the lock
        finally:
            connection.close()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema revision: {exc}") from exc


_REVISION = re.compile(r"^revision\b[^=\n]*=\s*[\"']([^\"']+)[\"']", re.MULTILINE)
_PARENTS = re.compile(r"^down_revision\b[^=\n]*=(.*)$", re.MULTILINE)


@functools.cache
def declared_head() -> str | None:
    """The newest revision as the scripts declare it (their ``revision = "..."`` and ``down_revision = ...``
    lines), read without importing Alembic or the scripts: the one revision that no other names as its parent.
    None when that is not one revision (Alembic then decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (SCRIPT_LOCATION / "versions").glob("*.py"):
        text = script.read_text(encoding="utf-8")
        found = _REVISION.search(text)
        if found is None:
            continue
        revisions.add(found.group(1))
        down = _PARENTS.search(text)
        if down is not None:
            parents.update(re.findall(r"[\"']([^\"']+)[\"']", down.group(1)))
    heads = revisions - parents
    return next(iter(heads)) if len(heads) == 1 else None


def at_declared_head(engine: Engine) -> bool:
    """Whether the database is at :func:`declared_head`, by one query of ``alembic_version`` (False for a new
    database, and whenever it cannot be told this way)."""
    head = declared_head()
    if head is None:
        return False
    try:
        with engine.connect() as connection:
            found = [row[0] for row in connection.exec_driver_sql("SELECT version_num FROM alembic_version")]
    except SQLAlchemyError:
        return False  # no version table yet: a new database
    return found == [head]


@functools.cache
def head_revision() -> str | None:
    """The newest revision among the packaged scripts."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = alembic_config()
    assert isinstance(config, Config)
    return ScriptDirectory.from_config(config).get_current_head()
