"""The engine, the session factory and the :class:`Storage` handle.

One engine per process (built by :func:`storage.open_storage`), one session per
unit of work (``with storage.session() as s:``). Sessions are never shared
between threads; the engine's connection pool is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from storage.config import StorageConfig, StorageLimits
from storage.failures import database_failures
from storage.lock import DataDirLock
from storage.mapping import LIMITS_KEY

logger = logging.getLogger(__name__)

# Repository functions put the SHA-256 of images they released here; the files
# are removed only after the transaction commits (a rollback keeps them).
RELEASED_IMAGES_KEY = "mipha.released_images"


def create_storage_engine(config: StorageConfig) -> Engine:
    """Build the process's engine; SQLite gets WAL, foreign keys and a busy timeout."""
    url = config.resolved_database_url
    # Errors quote the SQL but not its parameters: those are people's messages,
    # and the errors are logged.
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, hide_parameters=True)
    # Pooled connections move between Gradio's worker threads (never while in use).
    engine = create_engine(url, connect_args={"check_same_thread": False}, hide_parameters=True)
    _configure_sqlite(engine, busy_timeout_ms=config.busy_timeout_ms)
    return engine


def _configure_sqlite(engine: Engine, *, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module: it would otherwise
        # BEGIN lazily before the first write, and a transaction that read first
        # then fails to upgrade its lock with SQLITE_BUSY *without* waiting for
        # the busy timeout. We emit BEGIN IMMEDIATE ourselves (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cursor.execute("PRAGMA foreign_keys=ON")  # SQLite ignores REFERENCES otherwise
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Every transaction takes the write lock up front (waiting up to the busy
        # timeout), so concurrent writers queue instead of failing. Our
        # transactions are short, so reads queueing too costs little.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Storage:
    """An open data directory: the engine, the session factory and the images folder.

    Build it with :func:`storage.open_storage`; share one per process. It holds
    the data directory's lock (see :mod:`storage.lock`) until :meth:`close`.
    """

    def __init__(self, *, config: StorageConfig, engine: Engine, lock: DataDirLock | None = None) -> None:
        self.config = config
        self.engine = engine
        self._lock = lock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def images_dir(self) -> Path:
        return self.config.images_dir

    @property
    def limits(self) -> StorageLimits:
        return self.config.limits

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: commits when the block ends, rolls back if it raises.

        The session carries this storage's limits, so repository functions
        called with it enforce them. Never share a session between threads.
        A database failure (disk full, locked, read-only) leaves the block as a
        :class:`~storage.errors.StorageUnavailableError` subclass.
        """
        session = self._sessions(info={LIMITS_KEY: self.config.limits})
        try:
            with database_failures("running a unit of work"), session.begin():
                yield session
            released = session.info.pop(RELEASED_IMAGES_KEY, set())
        finally:
            session.close()
        if released:
            from storage.images import remove_image_files

            remove_image_files(self.images_dir, released)

    def close(self) -> None:
        """Release pooled connections and the data directory's lock (tests and shutdown)."""
        self.engine.dispose()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
