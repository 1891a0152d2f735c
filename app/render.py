"""Pure text helpers for the page: escaping, footers, relative times. No gradio, no I/O."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime

# Fenced code blocks (``` or ~~~) and inline code spans keep their text as is: Markdown shows
# their content literally already, and escaping there would print "&lt;" to the user.
_CODE = re.compile(r"(^|\n)(```|~~~)[^\n]*\n.*?(\n\2[^\n]*(?=\n|$)|$)|(`+)[^`\n]+?\4", re.S)


def escape_html(text: str) -> str:
    """Make any HTML in `text` show as text, never as markup, while Markdown still renders.

    The chatbot renders Markdown, which passes raw HTML through; its sanitizer removes scripts
    but would still render `<img>` or `<a>` that a model or a user wrote. Escaping `<`, `>` and
    `&` outside code keeps both intact as visible characters.
    """
    out, last = [], 0
    for match in _CODE.finditer(text):
        out.append(html.escape(text[last : match.start()], quote=False))
        out.append(match.group(0))
        last = match.end()
    out.append(html.escape(text[last:], quote=False))
    return "".join(out)


def reply_footer(*, tokens_per_second: float | None, completion_tokens: int | None, finish_reason: str | None,
                 status: str | None = None, first_token_seconds: float | None = None,
                 reused_tokens: int | None = None, prompt_tokens: int | None = None) -> str:
    """The small line under a reply: speed, length, time to first token, prompt tokens reused
    from the conversation's cache (only when some were), and how it ended when not normally.

    Every part is built from numbers and fixed words, so the line needs no escaping.
    """
    parts = []
    if tokens_per_second:
        parts.append(f"{tokens_per_second:.1f} tokens/s")
    if completion_tokens is not None:
        parts.append(f"{completion_tokens} tokens")
    if first_token_seconds is not None:
        parts.append(f"first token {first_token_seconds:.1f} s")
    if reused_tokens:
        of_prompt = f" of {prompt_tokens}" if prompt_tokens else ""
        parts.append(f"{reused_tokens}{of_prompt} prompt tokens reused")
    if status == "cancelled" or finish_reason == "cancelled":
        parts.append("stopped: partial reply")
    elif status == "interrupted":
        parts.append("interrupted: partial reply")
    elif status == "error":
        parts.append("failed")
    elif finish_reason == "length":
        parts.append("cut at the token limit")
    if not parts:
        return ""
    return f'\n\n<span class="reply-footer">{" · ".join(parts)}</span>'


def relative_time(then: datetime, *, now: datetime | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', 'yesterday', '4 days ago', then the date."""
    now = now or datetime.now(UTC)
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = (now - then).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    days = int(seconds // 86400)
    if days == 1:
        return "yesterday"
    if days < 7:
        return f"{days} days ago"
    return then.strftime("%Y-%m-%d")
