"""Replicas sharing one database: who is alive, and whose unfinished replies are orphans.

A reply is stored ``partial`` while it streams. When its server dies, the reply
must become ``interrupted`` (showing the text written so far), but only then:
with several servers on one PostgreSQL database, one server's restart must not
end another's live replies. So each open Storage on a shared database is a
*replica*: a row in ``replicas`` with a heartbeat that a background thread
refreshes every ``heartbeat_interval_s``, and every reply records the replica
streaming it (``messages.replica_id``). A reply's writer is gone when

- its replica has the same *home* (host and data directory) as a replica
  starting now: that is the same server restarted, since the data directory's
  lock (:mod:`storage.lock`) admits one server at a time;
- its replica's heartbeat is older than ``replica_timeout_s`` (compared on the
  database's clock, so replicas whose clocks differ agree), or its row is gone
  (a replica deletes its row when it closes);
- it has no replica (replies written before revision 0004).

Start-up and every heartbeat mark such replies ``interrupted`` and delete the
rows of gone replicas. SQLite keeps its simpler rule: one server per data
directory and database, so at start-up every ``partial`` reply is an orphan
(:func:`storage.messages.mark_interrupted_replies`), and there is no heartbeat.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Select, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from storage.advisory import REPLICA_SWEEP, hold_database_lock
from storage.errors import StorageError
from storage.models import Message, Replica
from storage.records import MessageStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaIdentity:
    """This process's replica: a new id for every open, and its home."""

    id: str
    home: str
    """``host:data_dir``; a later replica with the same home is this server restarted."""

    @classmethod
    def of(cls, replica_id: str, data_dir: Path) -> ReplicaIdentity:
        return cls(id=replica_id, home=f"{socket.gethostname()}:{data_dir.resolve()}"[:600])


def register_replica(session: Session, identity: ReplicaIdentity) -> None:
    """Insert this replica's row with a heartbeat of now (the database's now)."""
    now = database_now(session)
    session.add(Replica(id=identity.id, home=identity.home, pid=os.getpid(), started_at=now, heartbeat_at=now))
    session.flush()


def beat(session: Session, identity: ReplicaIdentity) -> None:
    """Refresh this replica's heartbeat; re-register if another replica took it for gone."""
    result = session.execute(
        update(Replica).where(Replica.id == identity.id).values(heartbeat_at=database_now(session))
    )
    if result.rowcount == 0:
        logger.warning("replica %s was taken for gone (no heartbeat for too long); registering again", identity.id)
        register_replica(session, identity)


def sweep_gone_replicas(session: Session, identity: ReplicaIdentity, *, timeout_s: float) -> int:
    """Mark the partial replies of gone replicas ``interrupted`` and forget those replicas.

    Returns how many replies were marked. Replicas sweep one at a time (an
    advisory lock), so two sweeps never wait on each other's rows.
    """
    hold_database_lock(session, REPLICA_SWEEP)
    live = _live_replicas(session, identity, timeout_s=timeout_s)
    result = session.execute(
        update(Message)
        .where(Message.status == MessageStatus.PARTIAL.value)
        .where(or_(Message.replica_id.is_(None), Message.replica_id.not_in(live)))
        .values(status=MessageStatus.INTERRUPTED.value, finish_reason="interrupted")
        .execution_options(synchronize_session=False)
    )
    session.execute(delete(Replica).where(Replica.id.not_in(live)).execution_options(synchronize_session=False))
    if result.rowcount:
        logger.warning("marked %d replies of stopped servers as interrupted", result.rowcount)
    return result.rowcount


def forget_replica(session: Session, identity: ReplicaIdentity) -> None:
    """Delete this replica's row (on close): its unfinished replies are then orphans for the others."""
    session.execute(delete(Replica).where(Replica.id == identity.id))


def database_now(session: Session) -> datetime:
    """The database server's clock: the one time all replicas share."""
    return session.scalar(select(func.now()))


def _live_replicas(session: Session, identity: ReplicaIdentity, *, timeout_s: float) -> Select:
    cutoff = database_now(session) - timedelta(seconds=timeout_s)
    return select(Replica.id).where(
        or_(Replica.id == identity.id, and_(Replica.home != identity.home, Replica.heartbeat_at >= cutoff))
    )


class Heartbeat:
    """A daemon thread that calls ``tick`` every ``interval_s`` until :meth:`stop`.

    A failing tick (the database unreachable for a while) is logged and retried
    at the next interval: the replica stays up and its replies keep streaming
    once the database is back.
    """

    def __init__(self, tick: Callable[[], None], *, interval_s: float, name: str) -> None:
        self._tick = tick
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self._tick()
            except StorageError as e:  # the cause was logged where it was translated
                logger.warning("replica heartbeat failed, retrying in %.0f s: %s", self._interval_s, e)
