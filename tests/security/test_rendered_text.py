"""Hostile text shown in the real app makes the browser fetch nothing and run nothing.

A local "beacon" HTTP server counts every request it gets. Questions typed in the page, a
model reply and a conversation title all point images, raw HTML and links at it; after the
page has shown them all, the beacon must have heard nothing and no script may have run.
The reply is written straight into the app's SQLite file, since the tiny model's replies
are random.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.app_process import RunningApp, running_app

pytestmark = pytest.mark.browser

ASSETS = Path(__file__).resolve().parents[2] / "assets"
TIMEOUT_MS = 30_000
REPLY_MARKER = "The reply ends here."


class Beacon:
    """An HTTP server on a free localhost port that records the path of every request."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        beacon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                beacon.paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_POST = do_HEAD = do_OPTIONS = do_GET

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the test reads `paths` instead."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[Beacon]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


def hostile_markdown(beacon: str, tag: str) -> str:
    """Everything a message could use to make a browser fetch `beacon` or run a script,
    between ordinary Markdown that must still render."""
    return "\n".join([
        f"**Bold {tag}** and *italic*, a [normal link]({beacon}/{tag}/link) and `inline <b>code</b>`.",
        "",
        "- first item",
        "- second item",
        "",
        "```html",
        f"<b>not bold</b> <img src={beacon}/{tag}/in-code>",
        "```",
        "",
        "| photo | verdict |",
        "|-------|---------|",
        "| cat   | ~~dog~~ cat |",
        "",
        f"![pixel]({beacon}/{tag}/md-image) ![ref][r] [![nested]({beacon}/{tag}/nested)]({beacon}/{tag}/n)",
        "",
        f"[r]: {beacon}/{tag}/ref-image",
        "",
        f"\\`<img src={beacon}/{tag}/backtick-bypass onerror=window.__ran=1>`",
        "",
        f"<img src={beacon}/{tag}/raw-img onerror=alert(1)>",
        "",
        f"<svg onload=\"fetch('{beacon}/{tag}/svg')\"><image href=\"{beacon}/{tag}/svg-image\"/></svg>",
        f"<iframe src=\"{beacon}/{tag}/iframe\"></iframe><video poster=\"{beacon}/{tag}/poster\"></video>",
        f"<link rel=stylesheet href=\"{beacon}/{tag}/css\"><style>@import '{beacon}/{tag}/import';</style>",
        f"<div style=\"background:url({beacon}/{tag}/style-url)\">styled</div>",
        f"&lt;img src={beacon}/{tag}/entity&gt;",
        f"[js](javascript:fetch('{beacon}/{tag}/js')) [JS](JaVaScRiPt:alert(1)) [data](data:text/html,hi)"
        " [rel](//evil.example/) [proto](/relative)",
        f"$$\\href{{{beacon}/{tag}/latex}}{{x}}$$",
        "",
        REPLY_MARKER if tag == "reply" else f"The {tag} ends here.",
    ])


@pytest.fixture(scope="module")
def beacon() -> Iterator[Beacon]:
    with Beacon().running() as server:
        yield server


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    data_dir = tmp_path_factory.mktemp("rendered-text") / "data"
    with running_app(data_dir, env={"MIPHA_MAX_NEW_TOKENS": "32"}, name="rendered-text-server") as running:
        yield running


def open_page(context, url: str, dialogs: list[str]):
    """A new tab on the app, ready to type in; any alert() it shows is recorded in `dialogs`."""
    page = context.new_page()
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url)
    page.locator("#chat-input textarea:not([disabled])").wait_for()
    return page


def ask(page, text: str) -> None:
    page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / "chelsea.jpg"))
    page.locator("#chat-input textarea").fill(text)
    page.locator("#send-button").click()
    page.locator("#chatbot .reply-footer").last.wait_for()


def write_reply_and_title(data_dir: Path, *, reply: str, title: str) -> None:
    """Replace the only conversation's reply and title in the app's SQLite file.

    Plain sqlite3, so the running server's hold on its data dir does not matter.
    """
    with closing(sqlite3.connect(data_dir / "mipha.sqlite3", timeout=10)) as db, db:
        db.execute("UPDATE messages SET text = ? WHERE role = 'assistant'", (reply,))
        db.execute("UPDATE conversations SET title = ?", (title,))


def assert_nothing_fetched_or_ran(page, beacon: Beacon, app_url: str, dialogs: list[str]) -> None:
    page.wait_for_timeout(1500)  # late loads (lazy images, styles) would have arrived by now
    assert beacon.paths == []
    assert dialogs == [] and page.evaluate("window.__ran") is None
    loaders = page.locator("#chatbot .message-content").locator(
        "img, picture, iframe, video, audio, object, embed, svg, style, link, [style*=url], [onerror], [onload]")
    assert loaders.evaluate_all("found => found.map(e => e.outerHTML)") == []
    for src in page.locator("#chatbot img").evaluate_all("imgs => imgs.map(i => i.getAttribute('src'))"):
        assert src.startswith(app_url), f"an image that is not the user's photo: {src}"


def assert_links_are_safe(page) -> None:
    """Gradio's sanitizer sets rel="noopener noreferrer" itself, dropping the renderer's nofollow."""
    links = page.locator("#chatbot .message-content a")
    assert links.count() > 0
    for href, target, rel in links.evaluate_all(
            "as => as.map(a => [a.getAttribute('href'), a.getAttribute('target'), a.getAttribute('rel')])"):
        assert href.startswith(("http://", "https://", "mailto:")), href
        assert target == "_blank" and {"noopener", "noreferrer"} <= set(rel.split()), (href, target, rel)


def test_hostile_question_reply_and_title_fetch_nothing(app, beacon, app_browser, app_screenshot):
    context = app_browser.new_context(viewport={"width": 1280, "height": 2400})
    context.set_default_timeout(TIMEOUT_MS)
    dialogs: list[str] = []
    page = open_page(context, app.url, dialogs)
    ask(page, hostile_markdown(beacon.url, "question"))
    page.locator("#chatbot [data-testid=user]", has_text="The question ends here.").wait_for()
    assert_nothing_fetched_or_ran(page, beacon, app.url, dialogs)

    title = f"<img src={beacon.url}/title onerror=window.__ran=1> **not bold**"
    write_reply_and_title(app.data_dir, reply=hostile_markdown(beacon.url, "reply"), title=title)
    page.close()
    page = open_page(context, app.url, dialogs)
    entry = page.locator("#conversation-list label", has_text="<img src=")
    entry.wait_for()
    assert title in entry.inner_text()
    assert page.locator("#conversation-list img").count() == 0
    entry.click()
    page.locator("#chatbot [data-testid=bot]", has_text=REPLY_MARKER).wait_for()
    assert_nothing_fetched_or_ran(page, beacon, app.url, dialogs)
    assert_links_are_safe(page)
    app_screenshot(page, "security-rendered-text")

    reply = page.locator("#chatbot [data-testid=bot]").last
    assert reply.locator("strong", has_text="Bold reply").count() == 1
    assert reply.locator("li").count() == 2
    assert reply.locator("table td", has_text="cat").count() == 2
    assert "<b>not bold</b>" in reply.locator("pre code").inner_text()
    assert "[image: pixel]" in reply.inner_text()
    assert f"<img src={beacon.url}/reply/raw-img onerror=alert(1)>" in reply.inner_text()
    assert page.locator("#chatbot .reply-footer").count() == 1

    control = context.new_page()  # the same browser does reach the beacon when a page shows an <img>
    control.set_content(f'<img src="{beacon.url}/control">')
    control.wait_for_function("() => document.images[0].complete")
    assert beacon.paths == ["/control"]
    context.close()
