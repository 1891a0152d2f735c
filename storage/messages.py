"""Messages of a conversation: questions, replies being streamed, regenerate.

Every function is scoped by owner: a message is found through its
conversation, with the owner in the same query.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.conversations import DEFAULT_TITLE, owned_conversation, title_from_text
from storage.errors import ImageNotFoundError, InvalidInputError, LimitExceededError, MessageNotFoundError
from storage.images import release_unused_images
from storage.mapping import limits_of, message_record
from storage.models import Conversation, Image, Message, utcnow
from storage.records import MessageRecord, MessageStatus, Role

logger = logging.getLogger(__name__)

PHOTO_TITLE = "Photo"
MAX_FINISH_REASON_CHARS = 32


def add_user_message(
    session: Session,
    *,
    owner_id: int,
    conversation_id: str,
    text: str,
    image_sha256: str | None = None,
) -> MessageRecord:
    """Append a question. The first question of an untitled conversation becomes its title."""
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    check_message_text(session, text)
    if not text.strip() and image_sha256 is None:
        raise InvalidInputError("A message needs some text or a photo.")
    if image_sha256 is not None and session.get(Image, image_sha256) is None:
        raise ImageNotFoundError(image_sha256)
    row = _append(session, conversation, role=Role.USER, text=text, status=MessageStatus.COMPLETE)
    row.image_sha256 = image_sha256
    if row.position == 0 and conversation.title == DEFAULT_TITLE:
        limit = limits_of(session).max_title_chars
        conversation.title = title_from_text(text, max_chars=limit) if text.strip() else PHOTO_TITLE
    session.flush()
    return message_record(row)


def start_assistant_message(session: Session, *, owner_id: int, conversation_id: str) -> MessageRecord:
    """Append an empty reply in status ``partial``; grow it with update_assistant_message."""
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    row = _append(session, conversation, role=Role.ASSISTANT, text="", status=MessageStatus.PARTIAL)
    session.flush()
    return message_record(row)


def update_assistant_message(
    session: Session,
    *,
    owner_id: int,
    message_id: int,
    text: str,
    status: MessageStatus = MessageStatus.PARTIAL,
    finish_reason: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    reused_tokens: int | None = None,
    first_token_seconds: float | None = None,
    duration_seconds: float | None = None,
) -> MessageRecord:
    """Replace a reply's text and status (and, when given, its counts and timings)."""
    check_message_text(session, text)
    if finish_reason is not None and len(finish_reason) > MAX_FINISH_REASON_CHARS:
        raise InvalidInputError(f"finish_reason is too long: {finish_reason[:40]!r}…")
    row = _owned_message(session, owner_id=owner_id, message_id=message_id)
    if row.role != Role.ASSISTANT:
        raise InvalidInputError(f"Message {message_id} is a question, not a reply; it cannot be updated.")
    now = utcnow()
    row.text, row.status, row.updated_at = text, MessageStatus(status).value, now
    optional = {
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "reused_tokens": reused_tokens,
        "first_token_seconds": first_token_seconds,
        "duration_seconds": duration_seconds,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(row, name, value)
    row.conversation.updated_at = now
    session.flush()
    return message_record(row)


def list_messages(session: Session, *, owner_id: int, conversation_id: str) -> list[MessageRecord]:
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    rows = session.scalars(
        select(Message).where(Message.conversation_id == conversation.id).order_by(Message.position)
    )
    return [message_record(row) for row in rows]


def delete_messages_from(
    session: Session, *, owner_id: int, conversation_id: str, position: int
) -> int:
    """Delete the messages at ``position`` and after (regenerate, edit a question).

    Returns how many were deleted; images no other message uses are released.
    """
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    rows = session.scalars(
        select(Message).where(Message.conversation_id == conversation.id, Message.position >= position)
    ).all()
    images = {row.image_sha256 for row in rows if row.image_sha256}
    for row in rows:
        session.delete(row)
    conversation.updated_at = utcnow()
    session.flush()
    release_unused_images(session, candidates=images)
    return len(rows)


def mark_interrupted_replies(session: Session) -> int:
    """Mark replies left ``partial`` by a stopped process as ``interrupted``.

    Run at start-up only: at that moment no reply can still be streaming in
    this process. Returns how many replies were marked.
    """
    result = session.execute(
        update(Message)
        .where(Message.status == MessageStatus.PARTIAL.value)
        .values(status=MessageStatus.INTERRUPTED.value, finish_reason="interrupted")
    )
    if result.rowcount:
        logger.warning("marked %d unfinished replies as interrupted", result.rowcount)
    return result.rowcount


def check_message_text(session: Session, text: str) -> None:
    if not isinstance(text, str):
        raise InvalidInputError(f"Message text must be a string, got {type(text).__name__}.")
    limit = limits_of(session).max_message_chars
    if len(text) > limit:
        raise LimitExceededError(
            f"The message has {len(text)} characters; the limit is {limit}. Shorten it or split it.",
            limit_name="max_message_chars",
            limit=limit,
            actual=len(text),
        )


def _append(
    session: Session, conversation: Conversation, *, role: Role, text: str, status: MessageStatus
) -> Message:
    last = session.scalar(
        select(func.max(Message.position)).where(Message.conversation_id == conversation.id)
    )
    position = 0 if last is None else last + 1
    limit = limits_of(session).max_messages_per_conversation
    if position >= limit:
        raise LimitExceededError(
            f"This conversation has reached {limit} messages, the most it can hold. "
            "Start a new conversation to go on.",
            limit_name="max_messages_per_conversation",
            limit=limit,
            actual=position + 1,
        )
    now = utcnow()
    row = Message(
        conversation_id=conversation.id,
        position=position,
        role=role.value,
        text=text,
        status=status.value,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    conversation.updated_at = now
    return row


def _owned_message(session: Session, *, owner_id: int, message_id: int) -> Message:
    row = session.scalars(
        select(Message)
        .join(Conversation, Message.conversation_id == Conversation.id)
        .where(Message.id == message_id, Conversation.owner_id == owner_id)
    ).one_or_none()
    if row is None:
        raise MessageNotFoundError(message_id)
    return row
