"""The engine, the session factory and the :class:`Storage` handle.

One engine per process (built by :func:`storage.open_storage`), one session per
unit of work (``with storage.session() as s:``). Sessions are never shared
between threads; the engine's connection pool is.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.config import StorageConfig, StorageLimits
from storage.errors import StorageError
from storage.failures import database_failures
from storage.lock import DataDirLock
from storage.mapping import LIMITS_KEY
from storage.replicas import Heartbeat, ReplicaIdentity, beat, forget_replica, sweep_gone_replicas

logger = logging.getLogger(__name__)

# Repository functions put the SHA-256 of images they released here; the files
# are removed only after the transaction commits (a rollback keeps them).
RELEASED_IMAGES_KEY = "mipha.released_images"


def create_storage_engine(config: StorageConfig) -> Engine:
    """Build the process's engine; SQLite gets WAL, foreign keys and a busy timeout,
    PostgreSQL a lock timeout of the same length."""
    url = config.resolved_database_url
    # Errors quote the SQL but not its parameters: those are people's messages,
    # and the errors are logged.
    if make_url(url).get_backend_name() == "postgresql":
        connect_args = {
            "options": f"-c lock_timeout={int(config.busy_timeout_ms)}",  # a wait past it: StorageBusyError
            "connect_timeout": 10,
            "application_name": "mipha-chat",
        }
        return create_engine(url, pool_pre_ping=True, hide_parameters=True, connect_args=connect_args)
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
    On a shared database it is also a replica (see :mod:`storage.replicas`):
    replies it streams carry :attr:`replica_id`, and a heartbeat thread keeps
    it known as alive.
    """

    def __init__(self, *, config: StorageConfig, engine: Engine, lock: DataDirLock | None = None) -> None:
        self.config = config
        self.engine = engine
        self._lock = lock
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.replica = ReplicaIdentity.of(uuid.uuid4().hex, config.data_dir)
        self._heartbeat: Heartbeat | None = None

    @property
    def images_dir(self) -> Path:
        return self.config.images_dir

    @property
    def replica_id(self) -> str:
        """Recorded on every reply this Storage starts."""
        return self.replica.id

    @property
    def photos_in_database(self) -> bool:
        """Photo bytes live in the database (shared databases); ``images_dir`` is then a cache."""
        return self.config.is_shared

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
            from storage.photo_store import remove_image_files

            remove_image_files(self.images_dir, released)

    def start_heartbeat(self) -> None:
        """Shared database: refresh this replica's heartbeat and sweep up after gone replicas, periodically."""
        if self._heartbeat is None:
            self._heartbeat = Heartbeat(self._beat, interval_s=self.config.heartbeat_interval_s,
                                        name=f"mipha-replica-{self.replica_id[:8]}")
            self._heartbeat.start()

    def _beat(self) -> None:
        with self.session() as session:
            beat(session, self.replica)
        with self.session() as session:
            sweep_gone_replicas(session, self.replica, timeout_s=self.config.replica_timeout_s)

    def close(self) -> None:
        """Stop the heartbeat, leave the replicas, release pooled connections and the data
        directory's lock (tests and shutdown). Idempotent."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
            try:
                with self.session() as session:
                    forget_replica(session, self.replica)
            except StorageError:  # logged; the others find this replica gone by its heartbeat
                pass
        self.engine.dispose()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
