"""SQLAlchemy ORM models. Private to ``storage``: other packages get records.

The schema is owned by the Alembic migrations in ``storage/migrations``; a test
checks that the migrations and these models agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, LargeBinary, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints so future migrations can alter them (SQLite batch mode needs names).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("kind", "identity"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    # anonymous: SHA-256 hex of the browser secret (the secret itself is never stored);
    # password / oauth: the username.
    identity: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_owner_updated", "owner_id", "updated_at"),)

    # Random (uuid4 hex), not a counter: ids appear in the UI and must not be guessable.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    model_id: Mapped[str | None] = mapped_column(String(200))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The last message of the branch on screen (added in 0003). No foreign key:
    # messages already point here, and the cycle would make SQLite's table
    # copies in migrations fragile. Storage moves it whenever it deletes messages.
    active_leaf_id: Mapped[int | None]

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Image(Base):
    __tablename__ = "images"

    # SHA-256 of the stored (cleaned) bytes; also the file name under images/.
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int]
    height: Mapped[int]
    size_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImageBlob(Base):
    """A photo's bytes, kept in the database when replicas share it (added in 0004).

    Written in the same transaction as the ``images`` row and deleted with it. On
    SQLite (one server per data directory) photos are files and this table stays empty.
    """

    __tablename__ = "image_blobs"

    sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Replica(Base):
    """A server process using a shared database, with the heartbeat that says it is alive (added in 0004).

    Replies name the replica streaming them, so that a replica starting up marks
    ``interrupted`` only the replies of replicas that are gone.
    """

    __tablename__ = "replicas"

    # Random (uuid4 hex), new for every open_storage.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Host name and data directory: a later replica with the same home is this one restarted.
    home: Mapped[str] = mapped_column(String(600))
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The database's clock, so replicas on machines whose clocks differ still agree.
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # Not unique since 0003: sibling messages (edits, regenerated replies) share a depth.
        Index("ix_messages_conversation_id_position", "conversation_id", "position"),
        Index("ix_messages_parent_id", "parent_id"),
        Index("ix_messages_status", "status"),
        Index("ix_messages_image_sha256", "image_sha256"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    # The message this one follows; None for a root question (added in 0003).
    # Deleting a message deletes the branch below it.
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    # Depth in the conversation tree: 0 for a root question.
    position: Mapped[int]
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text, default="")
    image_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("images.sha256", ondelete="RESTRICT")
    )
    status: Mapped[str] = mapped_column(String(16))
    # The replica that streams (or streamed) this reply; None for questions and
    # for replies written before 0004. No foreign key: replica rows go when
    # replicas do, and the id then still says whose reply it was.
    replica_id: Mapped[str | None] = mapped_column(String(32))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    # Prompt tokens whose KV states came from an earlier turn's cache (added in 0002).
    reused_tokens: Mapped[int | None]
    first_token_seconds: Mapped[float | None]
    duration_seconds: Mapped[float | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class Share(Base):
    """A read-only link to a conversation (added in 0003); kept, turned off, after revoking."""

    __tablename__ = "shares"
    __table_args__ = (Index("ix_shares_conversation_id", "conversation_id"),)

    # secrets.token_urlsafe(24): 32 characters, 192 random bits. The link is the only key.
    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
