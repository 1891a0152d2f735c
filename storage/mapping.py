"""Row -> record conversion, and the per-session context repository functions read."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from storage.config import StorageLimits
from storage.models import Conversation, Image, Message, Share, User
from storage.records import (
    ConversationRecord,
    ImageRecord,
    MessageRecord,
    MessageStatus,
    Role,
    ShareRecord,
    UserKind,
    UserRecord,
)

# Storage.session() puts the configured limits here, so every repository
# function enforces them without each caller having to pass them along.
LIMITS_KEY = "mipha.limits"
_DEFAULT_LIMITS = StorageLimits()


def limits_of(session: Session) -> StorageLimits:
    """The limits of the Storage this session came from (defaults for a bare Session)."""
    return session.info.get(LIMITS_KEY, _DEFAULT_LIMITS)


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything we store is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def user_record(row: User) -> UserRecord:
    kind = UserKind(row.kind)
    return UserRecord(
        id=row.id,
        kind=kind,
        name=None if kind is UserKind.ANONYMOUS else row.identity,
        created_at=as_utc(row.created_at),
    )


def conversation_record(row: Conversation) -> ConversationRecord:
    return ConversationRecord(
        id=row.id,
        owner_id=row.owner_id,
        title=row.title,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        model_id=row.model_id,
        settings=dict(row.settings or {}),
    )


def message_record(row: Message, *, sibling_ids: tuple[int, ...] = ()) -> MessageRecord:
    """The record of ``row``; without ``sibling_ids`` it says the message has no alternatives."""
    return MessageRecord(
        id=row.id,
        conversation_id=row.conversation_id,
        position=row.position,
        role=Role(row.role),
        text=row.text,
        image_sha256=row.image_sha256,
        status=MessageStatus(row.status),
        finish_reason=row.finish_reason,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        reused_tokens=row.reused_tokens,
        first_token_seconds=row.first_token_seconds,
        duration_seconds=row.duration_seconds,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
        parent_id=row.parent_id,
        sibling_ids=sibling_ids,
    )


def share_record(row: Share) -> ShareRecord:
    return ShareRecord(
        token=row.token,
        conversation_id=row.conversation_id,
        created_at=as_utc(row.created_at),
        revoked_at=None if row.revoked_at is None else as_utc(row.revoked_at),
    )


def image_record(row: Image) -> ImageRecord:
    return ImageRecord(
        sha256=row.sha256,
        format=row.format,
        width=row.width,
        height=row.height,
        size_bytes=row.size_bytes,
    )
