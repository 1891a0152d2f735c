"""Errors raised by the storage layer.

Every error derives from :class:`StorageError` and carries a message meant for
the person using the app: it names what went wrong and what to do about it.
The UI shows ``str(error)`` as is (``gr.Error(str(e))``), so messages never
contain internal paths, SQL or stack details.
"""

from __future__ import annotations


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
