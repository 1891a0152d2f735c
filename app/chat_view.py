"""Stored messages → what the chat shows and what the model reads: the one place a message is rendered.

No gradio and no I/O: photos are found through the `image_file` callable, rendered text comes
from `app.render`. The controls inside a message (edit a question, switch between versions) are
plain buttons; the chatbot's sanitizer keeps only their `class`, so the action and the message id
travel as class names (`action-edit message-12`), which `assets/app.js` turns into a page action.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.render import relative_time, render_markdown, reply_footer
from mipha_core.photos import Photo
from storage import ConversationRecord, MessageRecord, MessageStatus, Role

ImageFile = Callable[[str], Path | None]
WAITING_TEXT = "Waiting for a free turn of the model…"
UNSEEN_NOTE = '<span class="unseen-note">the model no longer sees this turn</span>'


def chatbot_messages(records: Sequence[MessageRecord], *, image_file: ImageFile, editable: bool = True,
                     unseen_turns: int = 0) -> list[dict]:
    """Chatbot messages (Gradio messages format): a photo, then its question, then the reply.

    Text content is HTML from `render_markdown`, which the chatbot shows without parsing it again.
    `editable` adds the edit button to questions (not on read-only views); the first
    `unseen_turns` questions say that the model no longer sees them (see `app.context_meter`).
    """
    shown: list[dict] = []
    questions = 0
    for record in records:
        if record.role is Role.USER:
            questions += 1
            path = image_file(record.image_sha256) if record.image_sha256 else None
            if path is not None:
                shown.append({"role": "user", "content": {"path": str(path), "alt_text": "your photo"}})
            controls = (_edit_button(record) if editable else "") + (UNSEEN_NOTE if questions <= unseen_turns else "")
            shown.append({"role": "user", "content": _text_or_blank(record) + _controls(record, controls)})
        else:
            shown.append({"role": "assistant", "content": assistant_html(record)})
    return shown


def growing_reply(shown: list[dict], stored: MessageRecord | None, *, text: str, waiting: bool) -> list[dict]:
    """The chat while a reply is written: `shown` (the conversation up to its question, rendered
    once per reply) and the text so far, re-rendered as it grows."""
    if waiting and not text:
        return [*shown, {"role": "assistant", "content": f'<p class="reply-waiting">{WAITING_TEXT}</p>'}]
    if stored is None:
        return [*shown, {"role": "assistant", "content": render_markdown(text) if text else "…"}]
    return [*shown, {"role": "assistant", "content": assistant_html(replace(stored, text=text,
                                                                            status=MessageStatus.PARTIAL))}]


def question_end(records: Sequence[MessageRecord]) -> int:
    """How many of `records` lead up to and include the last question (what a growing reply follows)."""
    return max((i for i, r in enumerate(records) if r.role is Role.USER), default=-1) + 1


def assistant_html(record: MessageRecord) -> str:
    """The reply as shown: rendered text, then its footer (speed, length, cache reuse, how it ended)."""
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
    return text + _controls(record, footer)


def _text_or_blank(record: MessageRecord) -> str:
    return render_markdown(record.text) if record.text.strip() else '<p class="photo-only">(photo)</p>'


def _edit_button(record: MessageRecord) -> str:
    return _action_button("edit", record.id, 'Edit<span class="sr-only"> this question</span>')


def _action_button(action: str, message_id: int, label: str) -> str:
    return f'<button type="button" class="message-action action-{action} message-{message_id}">{label}</button>'


def _controls(record: MessageRecord, extra: str) -> str:
    """The line under a message: its version switcher (when it has siblings) and `extra`."""
    switch = branch_switch(record)
    if not switch and not extra:
        return ""
    return f'<div class="message-controls">{switch}{extra}</div>'


def branch_switch(record: MessageRecord) -> str:
    """‹ 2/3 › between the versions of a question or reply (siblings after an edit or a regenerate)."""
    siblings = record.sibling_ids
    if len(siblings) < 2 or record.id not in siblings:
        return ""
    index = siblings.index(record.id)
    kind = "question" if record.role is Role.USER else "reply"

    def button(target: int | None, label: str, symbol: str) -> str:
        if target is None:
            return f'<span class="message-action-placeholder">{symbol}</span>'
        return _action_button("switch", target, f'{symbol}<span class="sr-only"> {label}</span>')

    previous = siblings[index - 1] if index > 0 else None
    following = siblings[index + 1] if index + 1 < len(siblings) else None
    return (f'<span class="branch-switch">'
            f'{button(previous, f"previous version of this {kind}", "‹")}'
            f'<span class="branch-position">{index + 1}/{len(siblings)}'
            f'<span class="sr-only"> versions of this {kind}</span></span>'
            f'{button(following, f"next version of this {kind}", "›")}</span>')


def model_messages(records: Sequence[Any], *, photo: Callable[[str], Photo]) -> list[dict[str, Any]]:
    """The Hugging Face chat messages the engine reads; ``photo`` gives a stored photo by its sha256
    (a ``StoredPhoto``, which the engine decodes only if it needs the pixels).

    Only the newest photo is sent: Mipha looks at one image per conversation.
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
                content = [{"type": "image", "image": photo(record.image_sha256)}]
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
