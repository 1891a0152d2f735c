"""Opening a data directory: folders, lock, engine, migrations, crash recovery."""

from __future__ import annotations

import logging
from contextlib import ExitStack

from storage.config import StorageConfig
from storage.db import Storage, create_storage_engine
from storage.errors import DataDirNotWritableError
from storage.failures import database_failures
from storage.images import sweep_images
from storage.lock import DataDirLock
from storage.messages import mark_interrupted_replies
from storage.migrate import upgrade_to_head

logger = logging.getLogger(__name__)


def open_storage(config: StorageConfig) -> Storage:
    """Open (or create) the data directory and make it ready to serve.

    Creates ``data_dir`` and ``images/``, locks the directory for this Storage
    (until ``close()`` or the process ends), builds the process's single
    engine, applies pending migrations, marks replies a previous run left
    ``partial`` as ``interrupted`` and removes image files nothing refers to.

    The lock is what makes that crash recovery safe: a second open of the same
    data directory, by another process or this one, raises DataDirInUseError
    before anything is touched. A directory that cannot be created or written
    raises DataDirNotWritableError. Both messages are for the operator.
    """
    _make_dirs(config)
    with ExitStack() as on_failure:
        lock = DataDirLock.acquire(config.data_dir)
        on_failure.callback(lock.release)
        storage = Storage(config=config, engine=create_storage_engine(config), lock=lock)
        on_failure.callback(storage.close)
        with database_failures("applying database migrations"):
            upgrade_to_head(storage.engine)
        with storage.session() as session:
            mark_interrupted_replies(session)
        sweep_images(storage)
        on_failure.pop_all()
    logger.info("storage ready at %s", config.data_dir)
    return storage


def _make_dirs(config: StorageConfig) -> None:
    try:
        config.images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataDirNotWritableError(config.data_dir, error=e) from e
