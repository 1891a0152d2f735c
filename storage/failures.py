"""Turn database and file-system failures into errors a person can read.

SQLAlchemy's ``OperationalError`` quotes the SQL, an ``OSError`` names the
path; neither belongs in front of the person using the app. This module is the
one place that maps them, by SQLite result code (or message) and by errno, to a
:class:`~storage.errors.StorageUnavailableError` subclass. The original is
logged here with its details and chained as ``__cause__``.

Use :func:`database_failures` around database work and :func:`file_failures`
around storage's own file writes. They are separate on purpose: an ``OSError``
raised by a caller's code inside ``with storage.session()`` is not storage's
to relabel.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError

from storage.errors import StorageBusyError, StorageFullError, StorageReadOnlyError, StorageUnavailableError

logger = logging.getLogger(__name__)

_ERRNO_KINDS: dict[int, type[StorageUnavailableError]] = {
    errno.ENOSPC: StorageFullError,
    errno.EDQUOT: StorageFullError,
    errno.EFBIG: StorageFullError,  # RLIMIT_FSIZE or the file system's file-size limit
    errno.EROFS: StorageReadOnlyError,
    errno.EACCES: StorageReadOnlyError,
    errno.EPERM: StorageReadOnlyError,
}
# SQLite primary result codes, https://sqlite.org/rescode.html
_SQLITE_KINDS: dict[int, type[StorageUnavailableError]] = {
    3: StorageReadOnlyError,  # SQLITE_PERM
    5: StorageBusyError,  # SQLITE_BUSY: "database is locked"
    6: StorageBusyError,  # SQLITE_LOCKED: "database table is locked"
    8: StorageReadOnlyError,  # SQLITE_READONLY: "attempt to write a readonly database"
    13: StorageFullError,  # SQLITE_FULL: "database or disk is full"
    14: StorageReadOnlyError,  # SQLITE_CANTOPEN: "unable to open database file"
}
# For drivers that give no result code: the same conditions by SQLite's message.
_MESSAGE_KINDS: tuple[tuple[str, type[StorageUnavailableError]], ...] = (
    ("database or disk is full", StorageFullError),
    ("database is locked", StorageBusyError),
    ("database table is locked", StorageBusyError),
    ("readonly database", StorageReadOnlyError),
    ("unable to open database file", StorageReadOnlyError),
)


def failure_kind(error: BaseException) -> type[StorageUnavailableError]:
    """The StorageUnavailableError subclass for a database or file-system error."""
    if isinstance(error, OSError):
        return _ERRNO_KINDS.get(error.errno or 0, StorageUnavailableError)
    original = getattr(error, "orig", error)
    code = getattr(original, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _SQLITE_KINDS:  # extended codes keep the primary in the low byte
        return _SQLITE_KINDS[code & 0xFF]
    text = str(original).lower()
    return next((kind for words, kind in _MESSAGE_KINDS if words in text), StorageUnavailableError)


@contextmanager
def database_failures(doing: str) -> Iterator[None]:
    """Raise a StorageUnavailableError for a database error in the block; ``doing`` goes to the log."""
    try:
        yield
    except DBAPIError as error:
        raise _translated(error, doing=doing) from error


@contextmanager
def file_failures(doing: str) -> Iterator[None]:
    """Raise a StorageUnavailableError for an OSError in the block; ``doing`` goes to the log."""
    try:
        yield
    except OSError as error:
        raise _translated(error, doing=doing) from error


def _translated(error: BaseException, *, doing: str) -> StorageUnavailableError:
    kind = failure_kind(error)
    # A busy database is expected under load and clears by itself; the rest needs the operator.
    level = logging.WARNING if kind is StorageBusyError else logging.ERROR
    logger.log(level, "storage failed while %s: %s", doing, error, exc_info=error)
    return kind()
