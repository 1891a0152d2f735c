"""Turn database and file-system failures into errors a person can read.

SQLAlchemy's ``OperationalError`` quotes the SQL, an ``OSError`` names the
path; neither belongs in front of the person using the app. This module is the
one place that maps them, by SQLite result code (or message), by PostgreSQL
SQLSTATE (or, for a connection that never opened, psycopg's message) and by
errno, to a :class:`~storage.errors.StorageUnavailableError` subclass. The original is
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

from storage.errors import (
    StorageBusyError,
    StorageFullError,
    StorageReadOnlyError,
    StorageUnavailableError,
    StorageUnreachableError,
)

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


# PostgreSQL SQLSTATEs, https://www.postgresql.org/docs/current/errcodes-appendix.html
_SQLSTATE_KINDS: dict[str, type[StorageUnavailableError]] = {
    "40001": StorageBusyError,  # serialization_failure
    "40P01": StorageBusyError,  # deadlock_detected
    "55P03": StorageBusyError,  # lock_not_available: lock_timeout (busy_timeout_ms) passed
    "57014": StorageBusyError,  # query_canceled: statement_timeout
    "53300": StorageBusyError,  # too_many_connections
    "53100": StorageFullError,  # disk_full
    "54000": StorageFullError,  # program_limit_exceeded (e.g. a row or value too large)
    "25006": StorageReadOnlyError,  # read_only_sql_transaction: a standby, or default_transaction_read_only
    "42501": StorageReadOnlyError,  # insufficient_privilege
    "57P01": StorageUnreachableError,  # admin_shutdown: the server is shutting down
    "57P02": StorageUnreachableError,  # crash_shutdown
    "57P03": StorageUnreachableError,  # cannot_connect_now: starting up or shutting down
}
_SQLSTATE_CLASS_KINDS: dict[str, type[StorageUnavailableError]] = {
    "08": StorageUnreachableError,  # connection_exception
    "53": StorageBusyError,  # insufficient_resources (memory, connections)
}
# psycopg's errors without a SQLSTATE: the connection failed or was lost, no server answered.
_CONNECTION_LOST = (
    "connection failed",
    "failed to resolve host",
    "could not connect",
    "connection refused",
    "connection timeout",
    "server closed the connection",
    "connection is lost",
    "the connection is closed",
    "consuming input failed",
    "sending query failed",
)


def failure_kind(error: BaseException) -> type[StorageUnavailableError]:
    """The StorageUnavailableError subclass for a database or file-system error."""
    if isinstance(error, OSError):
        return _ERRNO_KINDS.get(error.errno or 0, StorageUnavailableError)
    original = getattr(error, "orig", error)
    code = getattr(original, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _SQLITE_KINDS:  # extended codes keep the primary in the low byte
        return _SQLITE_KINDS[code & 0xFF]
    sqlstate = getattr(original, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return _SQLSTATE_KINDS.get(sqlstate) or _SQLSTATE_CLASS_KINDS.get(sqlstate[:2], StorageUnavailableError)
    text = str(original).lower()
    if _is_postgres_error(original) and any(words in text for words in _CONNECTION_LOST):
        return StorageUnreachableError
    return next((kind for words, kind in _MESSAGE_KINDS if words in text), StorageUnavailableError)


def connection_failure_reason(error: BaseException) -> str:
    """What psycopg said about a connection that failed, shortened for one line of a message.

    ``connection failed: connection to server at "db", port 5432 failed: Connection refused``
    becomes ``connection refused``; the server's own words (``database "x" does not exist``) stay.
    """
    lines = str(getattr(error, "orig", error)).strip().splitlines() or ["no answer"]
    reason = lines[0].rsplit("failed: ", 1)[-1].removeprefix("FATAL:").strip()
    if reason[:2].istitle():  # "Connection refused", not an acronym
        reason = reason[0].lower() + reason[1:]
    return reason


def _is_postgres_error(error: BaseException) -> bool:
    # By module, so that storage does not import psycopg unless a PostgreSQL URL is used.
    return type(error).__module__.split(".")[0] == "psycopg"


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
    # An unreachable database is said in full by the driver's message; its traceback adds nothing.
    trace = None if kind is StorageUnreachableError else error
    logger.log(level, "storage failed while %s: %s", doing, error, exc_info=trace)
    return kind()
