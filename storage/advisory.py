"""Database-wide locks for work only one replica may do at a time (PostgreSQL advisory locks).

Transaction-level (``pg_advisory_xact_lock``): held until the transaction that
took it commits or rolls back, so a crash can never leave one behind. On SQLite
every write transaction already holds the database's one write lock
(``BEGIN IMMEDIATE``), so these are no-ops there.
"""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

# Keys are arbitrary 64-bit numbers; these spell "mipha" and a small number, so
# that they do not collide with another application's locks by accident.
MIGRATIONS = 0x6D69706861_0001
"""Held while the schema is brought to head: replicas starting at once migrate one after another."""
REPLICA_SWEEP = 0x6D69706861_0002
"""Held while the replies of gone replicas are marked interrupted."""


def hold_database_lock(executor: Connection | Session, key: int, *, wait_without_limit: bool = False) -> None:
    """Take the lock ``key`` until the current transaction ends, waiting for another holder.

    The wait counts against ``lock_timeout`` (``StorageConfig.busy_timeout_ms``)
    unless ``wait_without_limit``: a migration may rightly take longer than that.
    """
    bind = executor.get_bind() if isinstance(executor, Session) else executor
    if bind.dialect.name != "postgresql":
        return
    if wait_without_limit:
        executor.execute(text("SET LOCAL lock_timeout = 0"))
    executor.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
