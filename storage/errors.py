"""Errors raised by the storage layer.

Every error derives from :class:`StorageError` and carries a message meant for
the person using the app: it names what went wrong and what to do about it.
The UI shows ``str(error)`` as is (``gr.Error(str(e))``), so messages never
contain internal paths, SQL or stack details. The exception is
:class:`DataDirError`, raised only by ``open_storage``: its message is for the
person starting the server and names the data directory.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path


class StorageError(Exception):
    """Base class of every error raised by ``storage``."""


class NotFoundError(StorageError):
    """A conversation, message or image does not exist *for this user*.

    Someone else's conversation raises exactly this error too, with the same
    message, so an id says nothing about whether it exists.
    """


class ConversationNotFoundError(NotFoundError):
    def __init__(self, conversation_id: str) -> None:
        super().__init__(
            f"Conversation {conversation_id!r} was not found. "
            "It may have been deleted; pick another one from the list or start a new one."
        )
        self.conversation_id = conversation_id


class MessageNotFoundError(NotFoundError):
    def __init__(self, message_id: int) -> None:
        super().__init__(
            f"Message {message_id} was not found. Reload the conversation and try again."
        )
        self.message_id = message_id


class ImageNotFoundError(NotFoundError):
    def __init__(self, sha256: str) -> None:
        super().__init__(
            f"The photo {sha256[:12]}… is no longer stored. Upload it again."
        )
        self.sha256 = sha256


class ShareNotFoundError(NotFoundError):
    """A shared link's token is unknown (or malformed: it is refused before any lookup)."""

    def __init__(self) -> None:
        super().__init__(
            "This shared link does not exist. Check the address, "
            "or ask the person who shared it for a new link."
        )


class ShareRevokedError(NotFoundError):
    """The owner turned the shared link off; it never comes back on."""

    def __init__(self) -> None:
        super().__init__(
            "The owner turned this shared link off. Ask them for a new link if you should still see it."
        )


class InvalidInputError(StorageError, ValueError):
    """A value given to a storage function is malformed (empty title, bad id, ...)."""


class LimitExceededError(StorageError):
    """A configured limit (:class:`storage.StorageLimits`) would be exceeded."""

    def __init__(self, message: str, *, limit_name: str, limit: int, actual: int) -> None:
        super().__init__(message)
        self.limit_name = limit_name
        self.limit = limit
        self.actual = actual


class InvalidImageError(StorageError):
    """Uploaded bytes are not an image we accept."""


class InvalidImportError(StorageError):
    """A conversation export given to :func:`storage.import_json` was refused.

    ``path`` names the offending field in the file (e.g. ``messages[3].text``).
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        where = f" (at {path})" if path else ""
        super().__init__(
            f"This file cannot be imported: {message}{where}. "
            "Nothing was changed; import a file made by Mipha Chat's JSON export."
        )
        self.path = path


class StorageUnavailableError(StorageError):
    """The server could not read or write its data; nothing the person did wrong.

    Raised by ``Storage.session()``, ``save_image``, ``import_json`` and
    ``ReplyWriter`` instead of the database's or the file system's own error
    (which names SQL and paths). That original is logged with its details and
    kept as ``__cause__``. Subclasses say what happened; this class itself is
    raised for failures that fit none of them.
    """

    default_message = (
        "The server could not save or load your data just now. Try again in a moment; "
        "if you run this server, its log has the details."
    )

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class StorageFullError(StorageUnavailableError):
    """The disk (or a quota, or a file-size limit) has no room for new data."""

    default_message = (
        "The server's disk is full, so nothing new can be saved right now. "
        "Try again later; if you run this server, free some disk space."
    )


class StorageBusyError(StorageUnavailableError):
    """The database stayed locked by another writer for longer than the busy timeout."""

    default_message = "The conversation database is busy; try again in a few seconds."


class StorageReadOnlyError(StorageUnavailableError):
    """The data directory or the database cannot be written (read-only disk, permissions)."""

    default_message = (
        "The server cannot write its data, so nothing new can be saved right now. "
        "If you run this server, check that the data directory is writable."
    )


class StorageUnreachableError(StorageUnavailableError):
    """The database server cannot be reached (down, network, refused the connection)."""

    default_message = (
        "The server cannot reach its conversation database just now, so nothing can be loaded or saved. "
        "Try again in a moment; if you run this server, check that the database is running and reachable."
    )


class DataDirError(StorageError):
    """``open_storage`` cannot use the data directory (or the database it names).

    Unlike the other errors, the message is for the person starting the server
    (it is shown in the terminal): it names the directory and the way out.
    """


class DataDirInUseError(DataDirError):
    """Another process (or another open Storage in this one) holds the data directory's lock."""

    def __init__(self, data_dir: Path, *, pid: int | None = None, started: datetime | None = None) -> None:
        super().__init__(
            f"Another Mipha Chat server{_holder(pid, started)} is using the data directory "
            f"{_dir_name(data_dir)}. Stop it first, or start this one with another --data-dir."
        )
        self.data_dir = data_dir
        self.pid = pid
        self.started = started


class DataDirNotWritableError(DataDirError):
    """The data directory cannot be created or written (read-only, permissions, disk full)."""

    def __init__(self, data_dir: Path, *, error: OSError) -> None:
        reason = error.strerror.lower() if error.strerror else "not writable"
        super().__init__(
            f"Mipha Chat cannot write to its data directory {_dir_name(data_dir)} ({reason}). "
            "Make it writable (or free some disk space), or choose another --data-dir."
        )
        self.data_dir = data_dir
        self.reason = reason


class DatabaseUnreachableError(DataDirError):
    """``open_storage`` could not connect to the database (``database_url``) to get it ready."""

    def __init__(self, url: str, *, reason: str) -> None:
        super().__init__(
            f"Mipha Chat cannot reach its database {url} ({reason}). "
            "Start the database, or check --database-url (MIPHA_DATABASE_URL)."
        )
        self.url = url
        self.reason = reason


def _dir_name(path: Path) -> str:
    text = str(path)
    return text if text.endswith(os.sep) else text + os.sep


def _holder(pid: int | None, started: datetime | None) -> str:
    details = []
    if pid is not None:
        details.append(f"pid {pid}")
    if started is not None:
        details.append(f"started {_when(started)}")
    return f" ({', '.join(details)})" if details else ""


def _when(moment: datetime) -> str:
    """Local time, with the date only when it is not today."""
    local = moment.astimezone()
    same_day = local.date() == datetime.now().astimezone().date()
    return local.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M")
