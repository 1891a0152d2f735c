"""Pure text helpers for the page: Markdown rendering, footers, relative times. No gradio, no I/O.

Every text a person or a model wrote (questions, replies, imported conversations) is shown through
`render_markdown`: markdown-it with raw HTML off, whose output can make the browser fetch nothing
and run nothing. The chatbot shows that HTML as is (`render_markdown=False` in `app.ui`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict

LINK_REL = "noopener noreferrer nofollow"
_WEB_SCHEMES = ("http", "https")
_IN_LINK = "mipha_in_link"  # key in markdown-it's per-render `env`


def render_markdown(text: str) -> str:
    """`text` as HTML: Markdown renders; raw HTML, images and unsafe links show as text.

    Tabs become `&#9;` (the same character to the browser) because Gradio passes every text
    message through `inspect.cleandoc`, which would expand them to spaces.
    """
    return _markdown().render(text).replace("\t", "&#9;")


def is_safe_link(url: str) -> bool:
    """Whether a link may point at `url`: absolute http(s) with a host, or mailto.

    An allowlist, not markdown-it's blocklist: relative and protocol-relative URLs
    (`/x`, `//evil/`) and every other scheme (`javascript:`, `data:`, `vbscript:`) are refused.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    scheme = parts.scheme.lower()
    if scheme == "mailto":
        return bool(parts.path)
    return scheme in _WEB_SCHEMES and bool(parts.netloc) and url[len(scheme):].startswith("://")


class _SafeRenderer(RendererHTML):
    """markdown-it's HTML renderer with the rules that decide what the browser may fetch.

    Methods named after token types are render rules (markdown-it collects them by name).
    Line breaks appear only inside code blocks: the chatbot lays out its HTML with
    `white-space: pre-line`, where the newlines markdown-it puts between tags would show
    as blank lines.
    """

    def renderToken(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        return super().renderToken(tokens, idx, options, env).replace("\n", "")

    def fence(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        _end_with_newline(tokens[idx])
        return super().fence(tokens, idx, options, env).removesuffix("\n")

    def code_block(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        _end_with_newline(tokens[idx])
        return super().code_block(tokens, idx, options, env).removesuffix("\n")

    def softbreak(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        return "<br>"

    def hardbreak(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        return "<br>"

    def image(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        """An image is never loaded: it shows as "[image: alt]", a link to it where that is safe."""
        token = tokens[idx]
        alt = self.renderInlineAsText(token.children, options, env).strip()
        label = escapeHtml(f"[image: {alt}]" if alt else "[image]")
        src = str(token.attrGet("src") or "")
        if not is_safe_link(src) or env.get(_IN_LINK):  # no <a> inside an <a>
            return label
        return f'<a href="{escapeHtml(src)}" target="_blank" rel="{LINK_REL}">{label}</a>'

    def link_open(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        """Links open in a new tab, tell the target nothing, and keep only a safe href.

        `validateLink` already refuses unsafe links while parsing; checking again here keeps
        that true for links any future rule creates.
        """
        token = tokens[idx]
        if not is_safe_link(str(token.attrGet("href") or "")):
            token.attrs.pop("href", None)
        token.attrSet("target", "_blank")
        token.attrSet("rel", LINK_REL)
        env[_IN_LINK] = True
        return self.renderToken(tokens, idx, options, env)

    def link_close(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        env[_IN_LINK] = False
        return self.renderToken(tokens, idx, options, env)

    def html_block(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        """Raw HTML is off in the parser; should any reach here, it shows as text."""
        return escapeHtml(tokens[idx].content)

    def html_inline(self, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        return escapeHtml(tokens[idx].content)


def _end_with_newline(token: Token) -> None:
    """Code that ends the text unclosed lacks its last newline; with it, `</code>` starts a line,
    so Gradio's `inspect.cleandoc` of the message finds no common indent to strip from the code."""
    if token.content and not token.content.endswith("\n"):
        token.content += "\n"


@cache
def _markdown() -> MarkdownIt:
    """CommonMark with raw HTML off, plus tables and strikethrough; single newlines break lines."""
    md = MarkdownIt("commonmark", {"html": False, "breaks": True, "xhtmlOut": False},
                    renderer_cls=_SafeRenderer)
    md.enable(["table", "strikethrough"])
    md.validateLink = is_safe_link  # checked for links, images, autolinks and references while parsing
    return md


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
    return f'<span class="reply-footer">{" · ".join(parts)}</span>'


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
