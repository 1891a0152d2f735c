"""Stored messages → what the chatbot shows and what the model reads. No gradio, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL.Image import Image

from app.render import relative_time, render_markdown, reply_footer
from storage import ConversationRecord, MessageRecord, MessageStatus, Role


def chatbot_messages(records: Sequence[MessageRecord], *, image_file: Callable[[str], Path | None]) -> list[dict]:
    """Chatbot messages (Gradio messages format): a photo, then its question, then the reply.

    Text content is HTML from `render_markdown`, which the chatbot shows without parsing it again.
    """
    shown: list[dict] = []
    for record in records:
        if record.role is Role.USER:
            path = image_file(record.image_sha256) if record.image_sha256 else None
            if path is not None:
                shown.append({"role": "user", "content": {"path": str(path), "alt_text": "your photo"}})
            if record.text.strip():
                shown.append({"role": "user", "content": render_markdown(record.text)})
        else:
            shown.append({"role": "assistant", "content": assistant_text(record)})
    return shown


def assistant_text(record: MessageRecord) -> str:
    """The reply as shown: rendered text, then its own footer (speed, length, cache reuse, how it ended)."""
    done = record.status is not MessageStatus.PARTIAL
    seconds = record.duration_seconds
    tokens = record.completion_tokens
    speed = tokens / seconds if tokens and seconds else None
    footer = reply_footer(
        tokens_per_second=speed if done else None,
        completion_tokens=tokens if done else None,
        first_token_seconds=record.first_token_seconds if done else None,
        reused_tokens=record.reused_tokens if done else None,
        prompt_tokens=record.prompt_tokens if done else None,
        finish_reason=record.finish_reason,
        status=record.status.value,
    )
    text = render_markdown(record.text) if record.text else ("…" if record.status is MessageStatus.PARTIAL else "")
    return text + footer


def model_messages(records: Sequence[MessageRecord], *, load_image: Callable[[str], Image]) -> list[dict[str, Any]]:
    """The Hugging Face chat messages the engine reads.

    Only the newest photo is loaded and sent: Mipha looks at one image per conversation.
    A question that got no reply (stopped before the first token) is folded into the next
    question, so user and assistant turns alternate as the prompt format expects.
    """
    newest_image = next((r.image_sha256 for r in reversed(records) if r.image_sha256), None)
    turns: list[dict[str, Any]] = []
    pending_user: dict[str, Any] | None = None
    for record in records:
        if record.role is Role.USER:
            content: list[dict[str, Any]] = []
            if pending_user is not None:  # the earlier question got no answer
                content += [c for c in pending_user["content"] if c["type"] == "image"]
            if record.image_sha256 and record.image_sha256 == newest_image:
                content = [{"type": "image", "image": load_image(record.image_sha256)}]
            content.append({"type": "text", "text": record.text})
            pending_user = {"role": "user", "content": content}
        elif record.text.strip() and pending_user is not None:
            turns += [pending_user, {"role": "assistant", "content": [{"type": "text", "text": record.text}]}]
            pending_user = None
    if pending_user is not None:
        turns.append(pending_user)
    return turns


def conversation_choices(conversations: Sequence[ConversationRecord]) -> list[tuple[str, str]]:
    """(label, id) pairs for the sidebar list: title and relative time, newest first."""
    return [(f"{c.title} · {relative_time(c.updated_at)}", c.id) for c in conversations]
