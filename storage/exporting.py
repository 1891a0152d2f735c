"""Export a conversation to Markdown or JSON, photos included as data URIs.

Data URIs (``data:image/jpeg;base64,...``) keep an export a single file that
can be read, mailed and imported back without unpacking an archive. The JSON
format is versioned (``"format": "mipha-chat-conversation", "version": 1``)
and is what :func:`storage.import_json` accepts.

Both formats hold the *active path* (what :func:`storage.list_messages`
returns, the branch on screen), not the other branches an edit or a
regenerated reply left: an export reads like the conversation as shown.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from storage.conversations import get_conversation
from storage.db import Storage
from storage.images import get_image
from storage.messages import list_messages
from storage.photo_store import image_path
from storage.records import ImageRecord, MessageRecord, MessageStatus, Role

EXPORT_FORMAT = "mipha-chat-conversation"
EXPORT_VERSION = 1
_SPEAKERS = {Role.USER: "You", Role.ASSISTANT: "Mipha"}


def export_json(session: Session, *, storage: Storage, owner_id: int, conversation_id: str) -> str:
    """The conversation's active path as JSON text (UTF-8, photos inline as data URIs)."""
    conversation = get_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    messages = list_messages(session, owner_id=owner_id, conversation_id=conversation_id)
    document = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "exported_at": datetime.now(UTC).isoformat(),
        "conversation": {
            "title": conversation.title,
            "model_id": conversation.model_id,
            "settings": conversation.settings,
            "created_at": conversation.created_at.isoformat(),
            "updated_at": conversation.updated_at.isoformat(),
        },
        "messages": [_message_json(session, storage, m) for m in messages],
    }
    return json.dumps(document, ensure_ascii=False, indent=1)


def export_markdown(
    session: Session,
    *,
    storage: Storage,
    owner_id: int,
    conversation_id: str,
    embed_images: bool = True,
) -> str:
    """The conversation's active path as Markdown; photos as inline data-URI images (or a placeholder)."""
    conversation = get_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    messages = list_messages(session, owner_id=owner_id, conversation_id=conversation_id)
    lines = [f"# {conversation.title}", ""]
    created = conversation.created_at.strftime("%Y-%m-%d %H:%M UTC")
    model = f" · model `{conversation.model_id}`" if conversation.model_id else ""
    lines += [f"_Started {created}{model}_", ""]
    for message in messages:
        lines += [f"**{_SPEAKERS[message.role]}:**", ""]
        if message.image_sha256:
            lines += [_markdown_image(session, storage, message.image_sha256, embed=embed_images), ""]
        if message.text:
            lines += [message.text, ""]
        if message.status is not MessageStatus.COMPLETE:
            lines += [f"_(reply {message.status.value})_", ""]
    return "\n".join(lines)


def _message_json(session: Session, storage: Storage, message: MessageRecord) -> dict[str, Any]:
    image = None
    if message.image_sha256:
        record = get_image(session, sha256=message.image_sha256)
        image = {"data_uri": _data_uri(session, storage, record), "width": record.width, "height": record.height}
    return {
        "role": message.role.value,
        "text": message.text,
        "image": image,
        "status": message.status.value,
        "finish_reason": message.finish_reason,
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "reused_tokens": message.reused_tokens,
        "first_token_seconds": message.first_token_seconds,
        "duration_seconds": message.duration_seconds,
        "created_at": message.created_at.isoformat(),
    }


def _data_uri(session: Session, storage: Storage, record: ImageRecord) -> str:
    data = image_path(storage, record.sha256, session=session).read_bytes()
    return f"data:{record.mime_type};base64,{base64.b64encode(data).decode('ascii')}"


def _markdown_image(session: Session, storage: Storage, sha256: str, *, embed: bool) -> str:
    if not embed:
        return f"_[photo {sha256[:12]}]_"
    return f"![photo]({_data_uri(session, storage, get_image(session, sha256=sha256))})"
