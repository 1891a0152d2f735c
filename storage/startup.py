"""Opening a data directory: folders, lock, engine, migrations, crash recovery."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from sqlalchemy import make_url

from storage.config import StorageConfig
from storage.db import Storage, create_storage_engine
from storage.errors import DatabaseUnreachableError, DataDirNotWritableError, StorageUnreachableError
from storage.failures import connection_failure_reason, database_failures
from storage.lock import DataDirLock
from storage.messages import mark_interrupted_replies
from storage.migrate import upgrade_to_head
from storage.photo_store import sweep_images
from storage.replicas import register_replica, sweep_gone_replicas

logger = logging.getLogger(__name__)


def open_storage(config: StorageConfig) -> Storage:
    """Open (or create) the data directory and make it ready to serve.

    Creates ``data_dir`` and ``images/``, locks the directory for this Storage
    (until ``close()`` or the process ends), builds the process's single
    engine, applies pending migrations, marks replies that no live server is
    streaming as ``interrupted`` and removes photos nothing refers to.

    The lock is what makes that crash recovery safe on SQLite: a second open
    of the same data directory, by another process or this one, raises
    DataDirInUseError before anything is touched, so every ``partial`` reply
    was left by a stopped server. On a shared database (PostgreSQL) other
    replicas may be streaming: this Storage registers as a replica, interrupts
    only the replies of replicas that are gone (see :mod:`storage.replicas`)
    and starts its heartbeat; migrations run under a database-wide lock, so
    replicas may start together on an empty database.

    A directory that cannot be created or written raises
    DataDirNotWritableError, a database that cannot be reached
    DatabaseUnreachableError. Those messages are for the operator.
    """
    _make_dirs(config)
    with ExitStack() as on_failure:
        lock = DataDirLock.acquire(config.data_dir)
        on_failure.callback(lock.release)
        storage = Storage(config=config, engine=create_storage_engine(config), lock=lock)
        on_failure.callback(storage.close)
        _migrate(storage)
        _recover_replies(storage)
        sweep_images(storage)
        if config.is_shared:
            storage.start_heartbeat()
        on_failure.pop_all()
    logger.info("storage ready at %s (replica %s)", config.data_dir, storage.replica_id)
    return storage


def _migrate(storage: Storage) -> None:
    try:
        with database_failures("applying database migrations"):
            upgrade_to_head(storage.engine)
    except StorageUnreachableError as e:
        url = make_url(storage.config.resolved_database_url).render_as_string(hide_password=True)
        raise DatabaseUnreachableError(url, reason=connection_failure_reason(e.__cause__)) from e


def _recover_replies(storage: Storage) -> None:
    """Mark the replies of stopped servers ``interrupted``: all of them on SQLite, per replica when shared."""
    if not storage.config.is_shared:
        with storage.session() as session:
            mark_interrupted_replies(session)
        return
    with storage.session() as session:
        register_replica(session, storage.replica)
    with storage.session() as session:
        sweep_gone_replicas(session, storage.replica, timeout_s=storage.config.replica_timeout_s)


def _make_dirs(config: StorageConfig) -> None:
    try:
        config.images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataDirNotWritableError(config.data_dir, error=e) from e
