"""Conversations: create, list and search, rename, settings, delete.

Every function takes ``owner_id`` and looks rows up by id *and* owner in one
query, so someone else's conversation and a missing one take the same path
and raise the same :class:`~storage.errors.ConversationNotFoundError`.

Writers that read before they write (the message tree, the per-person count)
first lock the row they depend on (``SELECT ... FOR UPDATE``): two servers on
one PostgreSQL database then take turns on a conversation instead of both
appending below the same message. SQLite needs no row locks (every write
transaction holds the database's write lock) and SQLAlchemy leaves them out there.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from storage.config import StorageLimits
from storage.errors import ConversationNotFoundError, InvalidInputError, LimitExceededError
from storage.mapping import conversation_record, limits_of
from storage.models import Conversation, Message, User, utcnow
from storage.photo_store import release_unused_images
from storage.records import ConversationRecord

logger = logging.getLogger(__name__)

DEFAULT_TITLE = "New conversation"
MAX_MODEL_ID_CHARS = 200
_CONVERSATION_ID = re.compile(r"[0-9a-f]{32}")
_MAX_QUERY_WORDS = 8


def title_from_text(text: str, *, max_chars: int) -> str:
    """A one-line title: whitespace collapsed, cut at a word boundary with an ellipsis."""
    title = " ".join(text.split())
    if len(title) <= max_chars:
        return title
    cut = title[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= max_chars // 2:  # a word boundary that keeps most of the text
        cut = cut[:space]
    return cut.rstrip(" ,;:.-") + "…"


def create_conversation(
    session: Session,
    *,
    owner_id: int,
    title: str | None = None,
    model_id: str | None = None,
    settings: dict[str, Any] | None = None,
) -> ConversationRecord:
    """A new, empty conversation. Without a title, the first question becomes it."""
    limits = limits_of(session)
    lock_owner(session, owner_id=owner_id)  # two servers must not both create the last one allowed
    count = count_conversations(session, owner_id=owner_id)
    if count >= limits.max_conversations_per_user:
        raise LimitExceededError(
            f"You have {count} conversations, the most this app keeps per person "
            f"({limits.max_conversations_per_user}). Delete some old ones to start a new one.",
            limit_name="max_conversations_per_user",
            limit=limits.max_conversations_per_user,
            actual=count + 1,
        )
    row = Conversation(
        id=uuid.uuid4().hex,
        owner_id=owner_id,
        title=DEFAULT_TITLE if title is None else _clean_title(session, title),
        model_id=_clean_model_id(model_id),
        settings=clean_settings(settings or {}, limits=limits_of(session)),
    )
    session.add(row)
    session.flush()
    return conversation_record(row)


def get_conversation(session: Session, *, owner_id: int, conversation_id: str) -> ConversationRecord:
    return conversation_record(owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id))


def list_conversations(
    session: Session, *, owner_id: int, query: str | None = None, limit: int = 200
) -> list[ConversationRecord]:
    """The owner's conversations, most recently updated first.

    ``query`` keeps conversations where every word appears (case-insensitively)
    in the title or in some message.
    """
    statement = select(Conversation).where(Conversation.owner_id == owner_id)
    for word in (query or "").split()[:_MAX_QUERY_WORDS]:
        pattern = f"%{_escape_like(word)}%"
        in_messages = (
            select(Message.id)
            .where(Message.conversation_id == Conversation.id)
            .where(Message.text.ilike(pattern, escape="\\"))
            .exists()
        )
        statement = statement.where(or_(Conversation.title.ilike(pattern, escape="\\"), in_messages))
    statement = statement.order_by(Conversation.updated_at.desc(), Conversation.id).limit(limit)
    return [conversation_record(row) for row in session.scalars(statement)]


def rename_conversation(
    session: Session, *, owner_id: int, conversation_id: str, title: str
) -> ConversationRecord:
    row = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    row.title = _clean_title(session, title)
    row.updated_at = utcnow()
    session.flush()
    return conversation_record(row)


def update_conversation_settings(
    session: Session,
    *,
    owner_id: int,
    conversation_id: str,
    settings: dict[str, Any],
    model_id: str | None = None,
) -> ConversationRecord:
    """Replace the generation settings (and the model id, when given)."""
    row = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    row.settings = clean_settings(settings, limits=limits_of(session))
    if model_id is not None:
        row.model_id = _clean_model_id(model_id)
    session.flush()
    return conversation_record(row)


def delete_conversation(session: Session, *, owner_id: int, conversation_id: str) -> None:
    """Delete a conversation and its messages; release images nothing else uses."""
    row = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id, for_update=True)
    image_shas = set(
        session.scalars(
            select(Message.image_sha256)
            .where(Message.conversation_id == row.id)
            .where(Message.image_sha256.is_not(None))
        )
    )
    session.delete(row)
    session.flush()
    release_unused_images(session, candidates=image_shas)
    logger.info("deleted conversation %s", conversation_id)


def owned_conversation(
    session: Session, *, owner_id: int, conversation_id: str, for_update: bool = False
) -> Conversation:
    """The row, or ConversationNotFoundError whether it is missing or someone else's.

    ``for_update`` locks the row until the transaction ends, for writers whose
    changes depend on the conversation's messages as they read them: the next
    such writer, in any process, waits and then reads what this one wrote.
    Lock the conversation before any of its messages, so writers never wait on
    each other in a circle.
    """
    if not isinstance(conversation_id, str) or not _CONVERSATION_ID.fullmatch(conversation_id):
        raise ConversationNotFoundError(str(conversation_id)[:40])
    statement = select(Conversation).where(Conversation.id == conversation_id, Conversation.owner_id == owner_id)
    if for_update:
        # populate_existing: a row this session loaded earlier is refreshed with what the lock saw.
        statement = statement.with_for_update().execution_options(populate_existing=True)
    row = session.scalars(statement).one_or_none()
    if row is None:
        raise ConversationNotFoundError(conversation_id)
    return row


def lock_owner(session: Session, *, owner_id: int) -> None:
    """Lock the user's row until the transaction ends (see the module docstring)."""
    session.execute(select(User.id).where(User.id == owner_id).with_for_update())


def count_conversations(session: Session, *, owner_id: int) -> int:
    return session.scalar(
        select(func.count()).select_from(Conversation).where(Conversation.owner_id == owner_id)
    )


def _escape_like(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _clean_title(session: Session, title: str) -> str:
    if not isinstance(title, str) or not title.strip():
        raise InvalidInputError("A conversation title cannot be empty; type a few words.")
    return title_from_text(title, max_chars=limits_of(session).max_title_chars)


def _clean_model_id(model_id: str | None) -> str | None:
    if model_id is not None and (not isinstance(model_id, str) or len(model_id) > MAX_MODEL_ID_CHARS):
        raise InvalidInputError(
            f"A model id must be a string of at most {MAX_MODEL_ID_CHARS} characters, got {model_id!r:.80}."
        )
    return model_id


def clean_settings(settings: dict[str, Any], *, limits: StorageLimits) -> dict[str, Any]:
    """Settings must be a JSON object within the size limit; stored as a copy."""
    if not isinstance(settings, dict):
        raise InvalidInputError(f"Generation settings must be a dict, got {type(settings).__name__}.")
    try:
        encoded = json.dumps(settings, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"Generation settings must be plain JSON values: {e}.") from e
    limit = limits.max_settings_bytes
    if len(encoded) > limit:
        raise LimitExceededError(
            f"The generation settings take {len(encoded)} bytes as JSON, more than the "
            f"{limit} allowed; remove unneeded entries.",
            limit_name="max_settings_bytes",
            limit=limit,
            actual=len(encoded),
        )
    return json.loads(encoded)
