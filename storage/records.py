"""Plain, frozen values returned by the repository functions.

The rest of the app sees these, never ORM rows: they are safe to pass across
threads and stay valid after the session that produced them is closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class UserKind(StrEnum):
    ANONYMOUS = "anonymous"
    """A browser identity: the browser keeps a random secret, we keep its SHA-256."""
    PASSWORD = "password"
    """A username from ``--auth`` (Gradio checks the password, not storage)."""
    OAUTH = "oauth"
    """A Hugging Face username from OAuth login on Spaces."""


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


class MessageStatus(StrEnum):
    COMPLETE = "complete"
    PARTIAL = "partial"
    """Still being streamed (or the process died before it finished)."""
    INTERRUPTED = "interrupted"
    """Was partial when the app last stopped; set at start-up."""
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class UserRecord:
    id: int
    kind: UserKind
    name: str | None
    """Username for password/OAuth users, ``None`` for anonymous ones."""
    created_at: datetime


@dataclass(frozen=True)
class ConversationRecord:
    id: str
    owner_id: int
    title: str
    created_at: datetime
    updated_at: datetime
    model_id: str | None
    settings: dict[str, Any]
    """Generation settings as stored (JSON object). A copy: changing it changes nothing."""


@dataclass(frozen=True)
class ImageRecord:
    sha256: str
    format: str
    """``"JPEG"`` or ``"PNG"``: the format of the stored bytes."""
    width: int
    height: int
    size_bytes: int

    @property
    def mime_type(self) -> str:
        return f"image/{self.format.lower()}"


@dataclass(frozen=True)
class MessageRecord:
    """One message of a conversation tree.

    ``position`` is the depth in the tree (0 for a root question). Siblings are
    the alternatives at one step: the questions an edit made, or the replies
    regenerating made.
    """

    id: int
    conversation_id: str
    position: int
    role: Role
    text: str
    image_sha256: str | None
    status: MessageStatus
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    reused_tokens: int | None
    """Prompt tokens taken from an earlier turn's KV cache; ``None`` when not recorded."""
    first_token_seconds: float | None
    duration_seconds: float | None
    created_at: datetime
    updated_at: datetime
    parent_id: int | None = None
    """The message this one follows; ``None`` for a root question."""
    sibling_ids: tuple[int, ...] = ()
    """Ids of the messages with the same parent, this one included, oldest first.

    Left empty, it becomes ``(id,)``: a message without alternatives.
    """

    def __post_init__(self) -> None:
        if not self.sibling_ids:
            object.__setattr__(self, "sibling_ids", (self.id,))


@dataclass(frozen=True)
class ShareRecord:
    """A read-only link to one conversation; the owner can turn it off at any time."""

    token: str
    conversation_id: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class SharedConversation:
    """What a shared link shows: the conversation and its active path when viewed."""

    conversation: ConversationRecord
    messages: list[MessageRecord]
    share: ShareRecord
