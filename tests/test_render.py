"""`app.render.render_markdown`: hostile text renders to HTML that fetches nothing and runs nothing,
while ordinary Markdown still looks like Markdown."""

from __future__ import annotations

import inspect
import time
from datetime import UTC, datetime
from html.parser import HTMLParser

import pytest

from app.render import LINK_REL, is_safe_link, render_markdown
from app.chat_view import chatbot_messages
from storage import MessageRecord, MessageStatus, Role

# What the renderer may emit, tag by tag; anything else (img, script, svg, iframe, style, ...) fails.
ALLOWED = {
    "a": {"href", "target", "rel", "title"}, "code": {"class"}, "ol": {"start"},
    "th": {"style"}, "td": {"style"},
    **{tag: set() for tag in ("p", "br", "strong", "em", "s", "pre", "ul", "li", "blockquote", "hr",
                              "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr")},
}

HOSTILE = {
    "markdown image": "![x](https://attacker.example/pixel?id=1)",
    "image without alt": "![](https://attacker.example/pixel)",
    "reference image": "![a][r]\n\n[r]: http://x/",
    "image in a link": "[![a](http://x/img)](http://x/)",
    "escaped backtick bypass": "\\`<img src=https://x/y>`",
    "escaped backticks around": "\\``<img src=https://x/y>`\\`",
    "raw img": "<img src=x onerror=alert(1)>",
    "raw html block": "<div>\n<img src=https://x/y>\n</div>",
    "script": "<script>alert(1)</script>",
    "svg onload": "<svg onload=alert(1)><image href=http://x/y /></svg>",
    "iframe": "<iframe src=http://x/></iframe>",
    "style import": "<style>@import 'http://x/a.css';</style>",
    "link stylesheet": '<link rel=stylesheet href="http://x/a.css">',
    "inline style url": '<span style="background:url(http://x/y)">x</span>',
    "entity-encoded tag": "&lt;img src=http://x/y&gt;",
    "numeric entities": "&#60;img src=http://x/y&#62;",
    "javascript link": "[x](javascript:alert(1))",
    "mixed-case javascript": "[x](JaVaScRiPt:alert(1))",
    "entity javascript": "[x](&#106;avascript:alert(1))",
    "escaped colon javascript": "[x](javascript&#58;alert(1))",
    "tab in scheme": "[x](<java\tscript:alert(1)>)",
    "vbscript": "[x](vbscript:msgbox(1))",
    "data html": "[x](data:text/html;base64,PHNjcmlwdD4=)",
    "data image": "![x](data:image/png;base64,iVBORw0KGgo=)",
    "file": "[x](file:///etc/passwd)",
    "protocol-relative": "[x](//evil.example/)",
    "relative": "[x](/gradio_api/file=/etc/passwd)",
    "fragment": "[x](#top)",
    "backslash host": "[x](http:\\\\evil.example)",
    "scheme without host": "[x](http:evil)",
    "autolink javascript": "<javascript:alert(1)>",
    "autolink data": "<data:text/html,hi>",
    "autolink http": "<http://x>",
    "autolink email": "<someone@example.com>",
    "reference javascript": "[x][r]\n\n[r]: javascript:alert(1)",
    "nested brackets": "[[[x]]](http://x/) [a[b]c](javascript:alert(1)) [![![x](http://a/)](http://b/)](http://c/)",
    "link title quote": '[x](http://x/ "a\\" onmouseover=alert(1) x=\\"")',
    "fence info injection": '```" onmouseover="alert(1)\ncode\n```',
    "latex href": "$$\\href{javascript:alert(1)}{x}$$",
    "unterminated everything": "[x](http://x/ ![y](http://y/ <img src=z `",
}


class Tags(HTMLParser):
    """Every start tag with its attributes, from rendered HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def tags_of(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(html)
    parser.close()
    return parser.found


def assert_fetches_and_runs_nothing(html: str) -> None:
    lowered = html.lower()
    for needle in ("<img", "<script", "<svg", "<iframe", "<style", "<link", "javascript:", "vbscript:", "data:"):
        if needle.endswith(":"):
            assert f'href="{needle}' not in lowered, html
        else:
            assert needle not in lowered, html
    for tag, attrs in tags_of(html):
        assert tag in ALLOWED, f"<{tag}> in {html}"
        assert set(attrs) <= ALLOWED[tag], f"<{tag} {attrs}> in {html}"
        if tag == "a":
            assert attrs.get("rel") == LINK_REL and attrs.get("target") == "_blank", html
            assert attrs.get("href") is None or is_safe_link(attrs["href"]), html
        if "style" in attrs:
            assert attrs["style"] in {"text-align:left", "text-align:right", "text-align:center"}, html


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_renders_to_html_that_fetches_and_runs_nothing(text: str):
    assert_fetches_and_runs_nothing(render_markdown(text))


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_is_safe_inside_every_block(text: str):
    for wrapped in (f"> {text}", f"- {text}", f"| a |\n|---|\n| {text} |", f"**{text}**", f"# {text}"):
        assert_fetches_and_runs_nothing(render_markdown(wrapped))


def test_images_show_as_a_visible_link_never_an_img():
    assert render_markdown("![a cat](http://x/cat.png)") == (
        f'<p><a href="http://x/cat.png" target="_blank" rel="{LINK_REL}">[image: a cat]</a></p>')
    assert render_markdown("![](https://x/y)").count("[image]") == 1
    assert render_markdown("![x](javascript:alert(1))") == "<p>![x](javascript:alert(1))</p>"
    nested = render_markdown("[![a](http://x/img)](http://x/)")
    assert nested.count("<a ") == 1 and "[image: a]" in nested


def test_raw_html_and_the_backtick_bypass_show_as_text():
    assert render_markdown("\\`<img src=https://x/y>`") == "<p>`&lt;img src=https://x/y&gt;`</p>"
    assert render_markdown("<b>bold?</b>") == "<p>&lt;b&gt;bold?&lt;/b&gt;</p>"
    assert render_markdown("&lt;img") == "<p>&lt;img</p>"


@pytest.mark.parametrize(("url", "safe"), [
    ("http://x/", True), ("https://example.com/a?b=c#d", True), ("HTTPS://X/", True),
    ("mailto:a@example.com", True), ("mailto:", False), ("javascript:alert(1)", False),
    ("JaVaScRiPt:alert(1)", False), ("data:text/html,x", False), ("vbscript:x", False),
    ("//evil/", False), ("/relative", False), ("relative", False), ("#top", False), ("http:evil", False),
    ("http:/evil", False), ("https:///evil", False), ("ftp://x/", False), ("http://[::1", False), ("", False),
])
def test_only_absolute_http_and_mailto_links_are_safe(url: str, safe: bool):
    assert is_safe_link(url) is safe


def test_links_get_rel_and_a_new_tab():
    assert render_markdown("[docs](https://example.com/a)") == (
        f'<p><a href="https://example.com/a" target="_blank" rel="{LINK_REL}">docs</a></p>')
    assert render_markdown("<http://x>").count(f'rel="{LINK_REL}"') == 1


def test_ordinary_markdown_still_renders():
    html = render_markdown("**bold** and *it*\nnext line\n\n- one\n- two\n\n1. first\n\n"
                           "```html\n<b>not bold</b>\n```\n\n| a | b |\n|---|---|\n| 1 | ~~2~~ |\n\n"
                           "> quoted `<i>`\n\n## Heading")
    assert html == (
        "<p><strong>bold</strong> and <em>it</em><br>next line</p>"
        "<ul><li>one</li><li>two</li></ul><ol><li>first</li></ol>"
        '<pre><code class="language-html">&lt;b&gt;not bold&lt;/b&gt;\n</code></pre>'
        "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td><s>2</s></td></tr></tbody></table>"
        "<blockquote><p>quoted <code>&lt;i&gt;</code></p></blockquote><h2>Heading</h2>")


@pytest.mark.parametrize("text", [
    "```\n    indented\n      more\n```", "```\n   unclosed\n   fence", "    code block\n      deeper",
    "> ```\n>    quoted\n>    code", "```\n\tTabs\n\t\tdeeper\n```", "a\tb\n\n- x\n\n      list code\n      more",
])
def test_gradio_cleandoc_leaves_the_html_as_is(text: str):
    """Gradio runs every text message through inspect.cleandoc; code indentation must survive it."""
    html = render_markdown(text)
    assert inspect.cleandoc(html) == html
    assert "\n" not in html.replace("</code></pre>", "").split("<pre>", 1)[0]  # newlines only inside code


@pytest.mark.parametrize("text", [
    "[" * 10_000, "[" * 20_000, "![" * 10_000, "[a" * 10_000, "[](" * 6_666, "*a" * 10_000,
    "*" * 10_000 + "a" + "_" * 10_000, "<" * 20_000, "`" * 20_000, "\\`" * 10_000, "> " * 10_000,
    "|a" * 10_000 + "\n" + "|-" * 10_000, "[a]: http://x\n" * 1_400,
], ids=lambda text: repr(text[:6]))
def test_pathological_input_renders_in_bounded_time(text: str):
    """A bound on CPU time that only a super-linear blow-up would break (figures live in bench/)."""
    start = time.process_time()
    render_markdown(text)
    assert time.process_time() - start < 2.0


def _message(role: Role, text: str, *, status: MessageStatus = MessageStatus.COMPLETE) -> MessageRecord:
    now = datetime.now(UTC)
    return MessageRecord(id=1, conversation_id="c" * 32, position=0, role=role, text=text, image_sha256=None,
                         status=status, finish_reason="stop", prompt_tokens=10, completion_tokens=20,
                         reused_tokens=None, first_token_seconds=0.1, duration_seconds=2.0,
                         created_at=now, updated_at=now)


def test_questions_and_replies_in_the_chatbot_use_the_renderer():
    hostile = "![x](http://x/p) <img src=http://x/q> **ok**"
    question, reply = chatbot_messages([_message(Role.USER, hostile), _message(Role.ASSISTANT, hostile)],
                                       image_file=lambda sha256: None)
    assert question["role"] == "user" and reply["role"] == "assistant"
    asked, controls = question["content"].split('<div class="message-controls">')
    assert asked == render_markdown(hostile)
    assert controls.startswith('<button type="button"') and "Edit" in controls and controls.endswith("</div>")
    rendered, footer = reply["content"].split('<div class="message-controls"><span class="reply-footer">')
    assert rendered == render_markdown(hostile)
    assert footer == "10.0 tokens/s · 20 tokens · first token 0.1 s</span></div>"
    for shown in (question["content"], reply["content"]):
        assert "<img" not in shown and "<strong>ok</strong>" in shown


def test_a_reply_still_streaming_shows_its_text_without_a_footer():
    (reply,) = chatbot_messages([_message(Role.ASSISTANT, "*so far*", status=MessageStatus.PARTIAL)],
                                image_file=lambda sha256: None)
    assert reply["content"] == "<p><em>so far</em></p>"
