"""Apply the Alembic migrations in ``storage/migrations`` programmatically.

No ``alembic.ini``: the configuration is built here and the open connection is
handed to ``env.py`` through ``config.attributes``.

On SQLite, migrations run with foreign keys off, as SQLite's documentation
prescribes for schema changes: batch mode copies a table, drops the original
and renames the copy, and with foreign keys on, dropping the original would
delete (ON DELETE CASCADE) the rows that refer to it. Every reference is
checked before the migration commits.

On PostgreSQL the whole upgrade is one transaction that first takes a
database-wide advisory lock (:mod:`storage.advisory`): replicas starting at
the same moment on an empty database migrate one after the other, and the
later ones find the schema at head instead of racing to create it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine

from storage.advisory import MIGRATIONS, hold_database_lock

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class BrokenReferencesError(RuntimeError):
    """A migration left rows that refer to missing rows; it was rolled back."""


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic interpolates "%" in options; escape it in URLs with passwords.
    config.set_main_option(
        "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Bring the database schema to the latest revision (a no-op when it is current)."""
    upgrade_to(engine, revision="head")
    logger.debug("database schema is at head")


def upgrade_to(engine: Engine, *, revision: str) -> None:
    """Upgrade the schema to ``revision`` (tests build old databases with it)."""
    _migrate(engine, lambda config: command.upgrade(config, revision))


def downgrade_to(engine: Engine, *, revision: str) -> None:
    """Downgrade the schema to ``revision``; see each revision for what it gives up."""
    _migrate(engine, lambda config: command.downgrade(config, revision))


def _migrate(engine: Engine, step: Callable[[Config], None]) -> None:
    config = alembic_config(engine)
    with engine.connect() as connection, _sqlite_foreign_keys_off(connection):
        with connection.begin():
            hold_database_lock(connection, MIGRATIONS, wait_without_limit=True)
            config.attributes["connection"] = connection
            step(config)
            _check_references(connection)


@contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite ignores this pragma inside a transaction: set it on the raw connection first."""
    if connection.dialect.name != "sqlite":
        yield
        return
    raw = connection.connection.driver_connection  # no SQLAlchemy autobegin
    was_on = raw.execute("PRAGMA foreign_keys").fetchone()[0]
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        raw.execute(f"PRAGMA foreign_keys={'ON' if was_on else 'OFF'}")


def _check_references(connection: Connection) -> None:
    if connection.dialect.name != "sqlite":
        return  # other databases keep enforcing foreign keys during migrations
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        table, rowid, parent, _ = broken[0]
        raise BrokenReferencesError(
            f"A database migration left {len(broken)} rows pointing at missing rows "
            f"(first: {table} row {rowid} -> {parent}), so it was rolled back and nothing changed. "
            "Report this with the server log; keep a copy of the data directory."
        )
