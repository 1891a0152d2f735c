"""Opening a data directory: folders, engine, migrations, crash recovery."""

from __future__ import annotations

import logging

from storage.config import StorageConfig
from storage.db import Storage, create_storage_engine
from storage.images import sweep_images
from storage.messages import mark_interrupted_replies
from storage.migrate import upgrade_to_head

logger = logging.getLogger(__name__)


def open_storage(config: StorageConfig) -> Storage:
    """Open (or create) the data directory and make it ready to serve.

    Creates ``data_dir`` and ``images/``, builds the process's single engine,
    applies pending migrations, marks replies a previous run left ``partial``
    as ``interrupted`` and removes image files nothing refers to.

    Call once per process: the crash recovery assumes no other process is
    streaming into the same database at this moment.
    """
    config.images_dir.mkdir(parents=True, exist_ok=True)
    engine = create_storage_engine(config)
    upgrade_to_head(engine)
    storage = Storage(config=config, engine=engine)
    with storage.session() as session:
        mark_interrupted_replies(session)
    sweep_images(storage)
    logger.info("storage ready at %s", config.data_dir)
    return storage
