"""Alembic environment: runs migrations on the engine handed over in ``config.attributes["engine"]``
(programmatic use, see histod.db.migrations.upgrade) or on ``sqlalchemy.url`` (the alembic CLI)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from histod.db.models import Base
from histod.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("engine")
    engine: Engine = given if isinstance(given, Engine) else make_engine(str(config.get_main_option("sqlalchemy.url")))
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode rebuilds a table (copy, drop, rename); dropping a table that other rows reference fails
            # while foreign keys are enforced. The pragma is a no-op inside a transaction, so it is set before
            # one starts, the keys are checked after, and the pooled connection gets them back.
            connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
            connection.commit()
        try:
            # SQLite: one transaction under the write lock for all revisions. pysqlite begins a transaction only
            # at the first INSERT/UPDATE/DELETE, so without BEGIN IMMEDIATE each CREATE/ALTER committed on its
            # own: a failed migration stayed half done, and two processes opening a new file together both
            # migrated it. Now the second waits (busy timeout), then finds the schema at head.
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=sqlite,
                transactional_ddl=True if sqlite else None,
            )
            with context.begin_transaction():
                if sqlite:
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                context.run_migrations()
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"foreign keys broken by the migration: {broken[:5]}")
        finally:
            if sqlite:
                connection.rollback()
                connection.exec_driver_sql("PRAGMA foreign_keys = ON")
                connection.commit()
    if given is None:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
