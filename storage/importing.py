"""Import a conversation from a JSON export, refusing anything unexpected.

The file is untrusted. Everything is validated before anything is written:
JSON shape and types, known fields only, lengths and counts against the
limits, timestamps, and every photo fully decoded by Pillow under the pixel
limit, then kept byte for byte if it is already a clean file like the ones
this app stores (so an export imported back keeps its pixels and finds its
photos already stored), or re-cleaned like an upload. Nothing in the file is
ever used as a path (photos are inline data URIs; stored names are the SHA-256
of the stored bytes). Then the photo files are written and the photo rows,
the conversation and its messages go into the database in one transaction, in
that order (messages refer to photos); if that fails, the new files are
removed. A failure of the disk or the database raises a
StorageUnavailableError subclass. An export holds one branch (the active
path), so the imported conversation is a single chain of messages whose last
one is the active leaf.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from storage.config import StorageLimits
from storage.conversations import (
    MAX_MODEL_ID_CHARS,
    clean_settings,
    count_conversations,
    create_conversation,
    title_from_text,
)
from storage.db import Storage
from storage.errors import InvalidImageError, InvalidImportError, InvalidInputError, LimitExceededError
from storage.exporting import EXPORT_FORMAT, EXPORT_VERSION
from storage.images import PreparedImage, prepare_imported_image
from storage.mapping import conversation_record
from storage.messages import MAX_FINISH_REASON_CHARS
from storage.models import Conversation, Message
from storage.photo_store import remove_image_files, store_image_row, write_image_file
from storage.records import ConversationRecord, MessageStatus, Role

logger = logging.getLogger(__name__)

_TOP_KEYS = {"format", "version", "exported_at", "conversation", "messages"}
_CONVERSATION_KEYS = {"title", "model_id", "settings", "created_at", "updated_at"}
_MESSAGE_KEYS = {
    "role", "text", "image", "status", "finish_reason", "prompt_tokens",
    "completion_tokens", "reused_tokens", "first_token_seconds", "duration_seconds", "created_at",
}
_IMAGE_KEYS = {"data_uri", "width", "height"}
_DATA_URI = re.compile(r"data:image/(jpeg|png|webp|gif);base64,([A-Za-z0-9+/=]*)", re.ASCII)
_MAX_TIMESTAMP_CHARS = 40


@dataclass(frozen=True)
class _ImportedMessage:
    role: Role
    text: str
    image: PreparedImage | None
    status: MessageStatus
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    reused_tokens: int | None
    first_token_seconds: float | None
    duration_seconds: float | None
    created_at: datetime | None


def import_json(storage: Storage, *, owner_id: int, data: bytes | str) -> ConversationRecord:
    """Add the exported conversation to ``owner_id``'s history as a new conversation.

    Raises InvalidImportError (or LimitExceededError) and changes nothing when
    the file is not a valid export within this storage's limits.
    """
    limits = storage.limits
    document = _parse(data, limits=limits)
    conversation, messages = _validate(document, limits=limits)
    with storage.session() as session:  # checked again inside the insert transaction
        _check_room(session, owner_id=owner_id, limits=limits)
    images = {m.image.sha256: m.image for m in messages if m.image is not None}
    written = _write_files(storage, images.values())
    try:
        with storage.session() as session:
            for image in images.values():  # each in a savepoint, so flushed before the messages
                store_image_row(session, image, keep_bytes=storage.photos_in_database)
            record = _insert(session, owner_id=owner_id, conversation=conversation, messages=messages)
    except BaseException:
        remove_image_files(storage.images_dir, written)
        raise
    logger.info("imported conversation %s with %d messages", record.id, len(messages))
    return record


def _write_files(storage: Storage, images: Iterable[PreparedImage]) -> list[str]:
    """Write the photo files that are not stored yet; returns their SHA-256s."""
    written: list[str] = []
    try:
        for image in images:
            if write_image_file(storage.images_dir, image):
                written.append(image.sha256)
    except BaseException:
        remove_image_files(storage.images_dir, written)
        raise
    return written


def _check_room(session: Session, *, owner_id: int, limits: StorageLimits) -> None:
    count = count_conversations(session, owner_id=owner_id)
    if count >= limits.max_conversations_per_user:
        raise LimitExceededError(
            f"You have {count} conversations, the most this app keeps per person. "
            "Delete some old ones before importing.",
            limit_name="max_conversations_per_user",
            limit=limits.max_conversations_per_user,
            actual=count + 1,
        )


def _parse(data: bytes | str, *, limits: StorageLimits) -> dict[str, Any]:
    if not isinstance(data, (bytes, str)):
        raise InvalidImportError(f"expected the file's bytes, got {type(data).__name__}")
    if len(data) > limits.max_import_bytes:
        raise LimitExceededError(
            f"The file is {len(data) / 1e6:.0f} MB; imports are limited to "
            f"{limits.max_import_bytes / 1e6:.0f} MB. Export a shorter conversation.",
            limit_name="max_import_bytes",
            limit=limits.max_import_bytes,
            actual=len(data),
        )
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        document = json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidImportError("it is not valid UTF-8 JSON") from e
    _require_object(document, keys=_TOP_KEYS, path="")
    if document.get("format") != EXPORT_FORMAT:
        raise InvalidImportError(f'"format" must be "{EXPORT_FORMAT}"', path="format")
    if document.get("version") != EXPORT_VERSION:
        raise InvalidImportError(f"only version {EXPORT_VERSION} exports can be imported", path="version")
    return document


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _validate(document: dict[str, Any], *, limits: StorageLimits) -> tuple[dict[str, Any], list[_ImportedMessage]]:
    conversation = _require_object(document.get("conversation"), keys=_CONVERSATION_KEYS, path="conversation")
    title = _string(conversation.get("title"), path="conversation.title", max_chars=limits.max_title_chars * 4)
    if not title.strip():
        raise InvalidImportError("the title is empty", path="conversation.title")
    settings = conversation.get("settings", {})
    if not isinstance(settings, dict):
        raise InvalidImportError("settings must be an object", path="conversation.settings")
    try:
        settings = clean_settings(settings, limits=limits)
    except InvalidInputError as e:
        raise InvalidImportError(str(e), path="conversation.settings") from e
    cleaned = {
        "title": title_from_text(title, max_chars=limits.max_title_chars),
        "model_id": _optional_string(
            conversation.get("model_id"), path="conversation.model_id", max_chars=MAX_MODEL_ID_CHARS
        ),
        "settings": settings,
        "created_at": _timestamp(conversation.get("created_at"), path="conversation.created_at"),
    }
    raw_messages = document.get("messages")
    if not isinstance(raw_messages, list):
        raise InvalidImportError("messages must be a list", path="messages")
    if len(raw_messages) > limits.max_messages_per_conversation:
        raise LimitExceededError(
            f"The file has {len(raw_messages)} messages; a conversation holds at most "
            f"{limits.max_messages_per_conversation}.",
            limit_name="max_messages_per_conversation",
            limit=limits.max_messages_per_conversation,
            actual=len(raw_messages),
        )
    messages = [_message(raw, path=f"messages[{i}]", limits=limits) for i, raw in enumerate(raw_messages)]
    return cleaned, messages


def _message(raw: Any, *, path: str, limits: StorageLimits) -> _ImportedMessage:
    raw = _require_object(raw, keys=_MESSAGE_KEYS, path=path)
    status = _choice(raw.get("status", "complete"), MessageStatus, path=f"{path}.status")
    return _ImportedMessage(
        role=_choice(raw.get("role"), Role, path=f"{path}.role"),
        text=_string(raw.get("text", ""), path=f"{path}.text", max_chars=limits.max_message_chars),
        image=_image(raw.get("image"), path=f"{path}.image", limits=limits),
        # A reply that was still streaming when exported is not streaming now.
        status=MessageStatus.INTERRUPTED if status is MessageStatus.PARTIAL else status,
        finish_reason=_optional_string(
            raw.get("finish_reason"), path=f"{path}.finish_reason", max_chars=MAX_FINISH_REASON_CHARS
        ),
        prompt_tokens=_count(raw.get("prompt_tokens"), path=f"{path}.prompt_tokens"),
        completion_tokens=_count(raw.get("completion_tokens"), path=f"{path}.completion_tokens"),
        reused_tokens=_count(raw.get("reused_tokens"), path=f"{path}.reused_tokens"),
        first_token_seconds=_seconds(raw.get("first_token_seconds"), path=f"{path}.first_token_seconds"),
        duration_seconds=_seconds(raw.get("duration_seconds"), path=f"{path}.duration_seconds"),
        created_at=_timestamp(raw.get("created_at"), path=f"{path}.created_at"),
    )


def _image(raw: Any, *, path: str, limits: StorageLimits) -> PreparedImage | None:
    if raw is None:
        return None
    raw = _require_object(raw, keys=_IMAGE_KEYS, path=path)
    uri = raw.get("data_uri")
    if not isinstance(uri, str):
        raise InvalidImportError("a photo must be given as a data URI string", path=f"{path}.data_uri")
    # Base64 is 4/3 the size of the bytes: refuse oversized photos before decoding.
    if len(uri) > limits.max_image_bytes * 4 // 3 + 100:
        raise LimitExceededError(
            f"A photo in the file is larger than the {limits.max_image_bytes / 1e6:.1f} MB limit.",
            limit_name="max_image_bytes",
            limit=limits.max_image_bytes,
            actual=len(uri) * 3 // 4,
        )
    match = _DATA_URI.fullmatch(uri)
    if match is None:
        raise InvalidImportError(
            "a photo must be an inline data:image/...;base64 URI (files and paths are not read)",
            path=f"{path}.data_uri",
        )
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImportError("a photo's base64 data is corrupt", path=f"{path}.data_uri") from e
    try:
        return prepare_imported_image(data, limits=limits)
    except InvalidImageError as e:
        raise InvalidImportError("a photo could not be decoded as an image", path=f"{path}.data_uri") from e


def _insert(
    session: Session, *, owner_id: int, conversation: dict[str, Any], messages: list[_ImportedMessage]
) -> ConversationRecord:
    record = create_conversation(
        session,
        owner_id=owner_id,
        title=conversation["title"],
        model_id=conversation["model_id"],
        settings=conversation["settings"],
    )
    row = session.get(Conversation, record.id)
    if conversation["created_at"] is not None:
        row.created_at = conversation["created_at"]
    parent_id = None
    for position, message in enumerate(messages):  # one branch: each message follows the one before
        fields = {k: v for k, v in vars(message).items() if k not in ("image", "role", "status", "created_at")}
        message_row = Message(
            conversation_id=row.id,
            parent_id=parent_id,
            position=position,
            role=message.role.value,
            status=message.status.value,
            image_sha256=message.image.sha256 if message.image else None,
            created_at=message.created_at or row.created_at,
            updated_at=message.created_at or row.created_at,
            **fields,
        )
        session.add(message_row)
        session.flush()
        parent_id = message_row.id
    row.active_leaf_id = parent_id
    session.flush()
    return conversation_record(row)


def _require_object(value: Any, *, keys: set[str], path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidImportError(f"expected an object, got {_type_name(value)}", path=path or "top level")
    unknown = set(value) - keys
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidImportError(f"unexpected field {name[:40]!r}", path=path or "top level")
    return value


def _string(value: Any, *, path: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidImportError(f"expected text, got {_type_name(value)}", path=path)
    if len(value) > max_chars:
        raise InvalidImportError(f"text of {len(value)} characters is over the limit of {max_chars}", path=path)
    return value


def _optional_string(value: Any, *, path: str, max_chars: int) -> str | None:
    return None if value is None else _string(value, path=path, max_chars=max_chars)


def _choice(value: Any, enum: type, *, path: str) -> Any:
    try:
        return enum(value)
    except ValueError as e:
        allowed = ", ".join(member.value for member in enum)
        raise InvalidImportError(f"expected one of {allowed}, got {str(value)[:40]!r}", path=path) from e


def _count(value: Any, *, path: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**9:
        raise InvalidImportError(f"expected a token count, got {str(value)[:40]!r}", path=path)
    return value


def _seconds(value: Any, *, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 10**7):
        raise InvalidImportError(f"expected a duration in seconds, got {str(value)[:40]!r}", path=path)
    return float(value)


def _timestamp(value: Any, *, path: str) -> datetime | None:
    if value is None:
        return None
    text = _string(value, path=path, max_chars=_MAX_TIMESTAMP_CHARS)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as e:
        raise InvalidImportError(f"expected an ISO 8601 time, got {text!r}", path=path) from e
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(value), type(value).__name__
    )
