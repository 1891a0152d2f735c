"""Turns a Hugging Face chat-format message list into question/answer turns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from mipha_core.errors import InvalidMessagesError
from mipha_core.photos import Photo, StoredPhoto


@dataclass(frozen=True)
class Turn:
    """One user question, the image attached to it (if any), and the reply (None if unanswered)."""

    question: str
    answer: str | None = None
    image: Photo | None = None


SYSTEM_ROLES = frozenset({"system", "developer"})


def split_system(messages: Sequence[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The text of leading system messages (None without any), and the messages after them.

    A system message replaces the template's own system sentence; it carries text only.
    """
    rest = list(messages)
    texts: list[str] = []
    while rest and isinstance(rest[0], dict) and rest[0].get("role") in SYSTEM_ROLES:
        text, images = _split_content(rest.pop(0).get("content"), len(texts))
        if images:
            raise InvalidMessagesError(f"message {len(texts)}: a system message cannot carry images")
        texts.append(text)
    return ("\n".join(texts) if texts else None), rest


def turns_from_messages(messages: Sequence[dict[str, Any]]) -> list[Turn]:
    """Pair alternating user/assistant messages into turns; the last turn must be a question.

    ``messages`` follow the Hugging Face chat format: ``{"role": ..., "content": str | list}``
    where list items are ``{"type": "text", "text": ...}`` or ``{"type": "image", "image": photo}``
    with a PIL image or a ``StoredPhoto`` (decoded only when its pixels are needed).
    """
    if not messages:
        raise InvalidMessagesError("messages is empty: send at least one user message")
    turns: list[Turn] = []
    expected = "user"
    question = ""
    image: Photo | None = None
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role != expected:
            raise InvalidMessagesError(
                f"message {position} has role {role!r}, expected {expected!r}: "
                "messages must alternate user/assistant and start with user"
            )
        text, images = _split_content(message.get("content"), position)
        if role == "user":
            question, image = text, (images[-1] if images else None)
            expected = "assistant"
        else:
            if images:
                raise InvalidMessagesError(f"message {position}: assistant messages cannot carry images")
            turns.append(Turn(question=question, answer=text, image=image))
            expected = "user"
    if expected == "user":
        raise InvalidMessagesError("the last message is an assistant reply: end with a user message")
    turns.append(Turn(question=question, answer=None, image=image))
    return turns


def _split_content(content: Any, position: int) -> tuple[str, list[Photo]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidMessagesError(
            f"message {position}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    texts: list[str] = []
    images: list[Photo] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image" and isinstance(part.get("image"), Image.Image | StoredPhoto):
            images.append(part["image"])
        else:
            raise InvalidMessagesError(
                f"message {position}: unsupported content part {part!r}; use "
                '{"type": "text", "text": str} or {"type": "image", "image": PIL.Image | StoredPhoto}'
            )
    return "\n".join(texts), images
