"""Mipha Chat persistence: users, conversations, messages, photos and share links.

Open the data directory once per process, then do each unit of work in its
own session::

    storage = open_storage(StorageConfig(data_dir=Path("data")))
    with storage.session() as s:
        user = user_for_browser_secret(s, secret=secret)
        conversation = create_conversation(s, owner_id=user.id)
        add_user_message(s, owner_id=user.id, conversation_id=conversation.id, text="Hi")

Repository functions take the session first and everything else by keyword,
and return frozen records (never ORM rows). Every conversation and message
function takes ``owner_id``; another user's conversation raises the same
``ConversationNotFoundError`` as a missing one. All errors derive from
``StorageError`` and their message is written for the person using the app;
a failing disk or database raises a ``StorageUnavailableError`` subclass
(``StorageFullError``, ``StorageBusyError``, ``StorageReadOnlyError``,
``StorageUnreachableError``), never the driver's error. ``open_storage`` locks
the data directory for the life of the Storage and raises ``DataDirError``
subclasses (``DataDirInUseError``, ``DataDirNotWritableError``,
``DatabaseUnreachableError``), whose messages are for the operator.

SQLite (the default) admits one server per data directory. A PostgreSQL
``database_url`` may be shared by several servers (replicas), each with its
own data directory: photos then live in the database (each data directory
caches them), and each replica's start-up interrupts only the replies of
replicas that are gone (see ``storage.replicas`` and ``storage.photo_store``).

A conversation is a tree of messages: ``add_user_message(..., edit_of=id)``
adds a sibling of a question, ``regenerate_from`` readies a sibling reply,
``switch_branch`` shows another branch, and nothing is overwritten.
``list_messages`` returns the *active path* (root to the active leaf), each
record with its ``parent_id`` and ``sibling_ids``.

``share_conversation`` makes a read-only link token that ``revoke_share``
turns off for good; ``shared_conversation`` and ``shared_image_path`` serve it
to anyone holding the token (no ``owner_id``), raising ``ShareNotFoundError``,
``ShareRevokedError`` or ``ImageNotFoundError``.

Nothing here imports torch or gradio.
"""

from storage.branches import regenerate_from, switch_branch
from storage.config import StorageConfig, StorageLimits
from storage.conversations import (
    DEFAULT_TITLE,
    create_conversation,
    delete_conversation,
    get_conversation,
    list_conversations,
    rename_conversation,
    title_from_text,
    update_conversation_settings,
)
from storage.db import Storage
from storage.errors import (
    ConversationNotFoundError,
    DatabaseUnreachableError,
    DataDirError,
    DataDirInUseError,
    DataDirNotWritableError,
    ImageNotFoundError,
    InvalidImageError,
    InvalidImportError,
    InvalidInputError,
    LimitExceededError,
    MessageNotFoundError,
    NotFoundError,
    ShareNotFoundError,
    ShareRevokedError,
    StorageBusyError,
    StorageError,
    StorageFullError,
    StorageReadOnlyError,
    StorageUnavailableError,
    StorageUnreachableError,
)
from storage.exporting import export_json, export_markdown
from storage.images import get_image, save_image
from storage.importing import import_json
from storage.messages import (
    add_user_message,
    delete_messages_from,
    list_messages,
    start_assistant_message,
    title_photo_conversation,
    update_assistant_message,
)
from storage.photo_store import cache_all_photos, image_path
from storage.records import (
    ConversationRecord,
    ImageRecord,
    MessageRecord,
    MessageStatus,
    Role,
    SharedConversation,
    ShareRecord,
    UserKind,
    UserRecord,
)
from storage.shares import revoke_share, share_conversation, share_of, shared_conversation, shared_image_path
from storage.startup import open_storage
from storage.streaming import ReplyWriter
from storage.users import get_user, user_for_browser_secret, user_for_oauth, user_for_password_login

__all__ = [
    "DEFAULT_TITLE",
    "ConversationNotFoundError",
    "ConversationRecord",
    "DataDirError",
    "DataDirInUseError",
    "DatabaseUnreachableError",
    "DataDirNotWritableError",
    "ImageNotFoundError",
    "ImageRecord",
    "InvalidImageError",
    "InvalidImportError",
    "InvalidInputError",
    "LimitExceededError",
    "MessageNotFoundError",
    "MessageRecord",
    "MessageStatus",
    "NotFoundError",
    "ReplyWriter",
    "Role",
    "ShareNotFoundError",
    "ShareRecord",
    "ShareRevokedError",
    "SharedConversation",
    "Storage",
    "StorageBusyError",
    "StorageConfig",
    "StorageError",
    "StorageFullError",
    "StorageLimits",
    "StorageReadOnlyError",
    "StorageUnavailableError",
    "StorageUnreachableError",
    "UserKind",
    "UserRecord",
    "add_user_message",
    "cache_all_photos",
    "create_conversation",
    "delete_conversation",
    "delete_messages_from",
    "export_json",
    "export_markdown",
    "get_conversation",
    "get_image",
    "get_user",
    "image_path",
    "import_json",
    "list_conversations",
    "list_messages",
    "open_storage",
    "regenerate_from",
    "rename_conversation",
    "revoke_share",
    "save_image",
    "share_conversation",
    "share_of",
    "shared_conversation",
    "shared_image_path",
    "start_assistant_message",
    "switch_branch",
    "title_photo_conversation",
    "title_from_text",
    "update_assistant_message",
    "update_conversation_settings",
    "user_for_browser_secret",
    "user_for_oauth",
    "user_for_password_login",
]
