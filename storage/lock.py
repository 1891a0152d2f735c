"""One server per data directory: an exclusive OS lock held while storage is open.

Two servers on one data directory would each run the start-up crash recovery
over the other's live data: marking its streaming replies ``interrupted`` and
deleting photos it has written but not yet attached to a message. So
``open_storage`` takes ``flock(LOCK_EX)`` on ``<data_dir>/.lock`` before it
touches anything. The kernel drops the lock when the holder closes it or
dies, even by SIGKILL, so a crash never leaves a stale lock; the pid and start
time written into the file only serve the error message.

flock belongs to the open file, not to the process, so a second open of the
same data directory in the same process is refused too. The lock file is
opened read-only (creating it if needed): the holder keeps no file open for
writing just for the lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from datetime import datetime
from pathlib import Path

from storage.errors import DataDirInUseError, DataDirNotWritableError

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".lock"


class DataDirLock:
    """The held lock on one data directory; :meth:`release` (or the process ending) frees it."""

    def __init__(self, *, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Lock ``data_dir`` (which must exist) or raise DataDirInUseError / DataDirNotWritableError."""
        path = data_dir / LOCK_FILE_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataDirNotWritableError(data_dir, error=e) from e
        lock = cls(path=path, fd=fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.release()
            pid, started = _read_holder(path)
            raise DataDirInUseError(data_dir, pid=pid, started=started) from None
        try:
            _write_holder(path)  # also proves the directory is writable
        except OSError as e:
            lock.release()
            raise DataDirNotWritableError(data_dir, error=e) from e
        logger.debug("locked %s", path)
        return lock

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays: removing it would race with the next opener."""
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None


def _write_holder(path: Path) -> None:
    # A second open of the file: closing it does not release the flock, which
    # belongs to the first one.
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    path.write_text(json.dumps({"pid": os.getpid(), "started": started}) + "\n", encoding="utf-8")


def _read_holder(path: Path) -> tuple[int | None, datetime | None]:
    """The holder's pid and start time; None if it has not written them (yet)."""
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
        return int(written["pid"]), datetime.fromisoformat(written["started"])
    except (OSError, ValueError, TypeError, KeyError):
        return None, None
