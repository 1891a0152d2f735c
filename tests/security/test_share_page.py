"""Read-only share links: `/share/{token}` shows one conversation, inert, and stops when turned off.

Most tests mount the routes with `app.web.app_kwargs` on a small Starlette app, so the guard
and its headers are the real ones, over a real SQLite file. One test launches a real Gradio
app in this process (are the routes matched before Gradio's, and is the login still
required?); the last one goes through `launch.py`, once it wires the routes in.
"""

from __future__ import annotations

import html
import inspect
import io
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.testclient import TestClient

import launch
import storage as db
from app.settings import Credential, Settings
from app.share_page import share_routes
from app.web import app_kwargs, stored_photo_lookup
from tests.app_process import free_port, running_app

HOSTILE_TITLE = '<script>alert(1)</script><img src=x onerror=alert(2)>'
HOSTILE_TEXTS = (
    "<script>alert(3)</script>",
    '<img src="http://evil.example/a.png" onerror="alert(4)">',
    "![tracker](http://evil.example/pixel.png)",
    "[click](javascript:alert(5)) <a href='http://evil.example/' onclick='alert(6)'>x</a>",
    "# A heading written in a message\n<style>body{display:none}</style><iframe src=//evil.example>",
)
GARBAGE_TOKENS = (
    "..%2F..%2Fdata%2Fmipha.sqlite3", "..", "A" * 500, "%00", "x'--", "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    "%3Cimg%20src%3Dhttp%3A%2F%2Fevil.example%20onerror%3Dalert(1)%3E", "%3Cb%20onclick%3Dalert(1)%3E",
)
LEAKS = ("Traceback", "Error", "sqlite", "SELECT", "/tmp", str(Path.home()), ".py")


@dataclass(frozen=True)
class Shared:
    """A shared conversation: its link's token and its photo."""

    token: str
    conversation_id: str
    photo_sha256: str | None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[db.Storage]:
    storage = db.open_storage(db.StorageConfig(data_dir=tmp_path / "data"))
    yield storage
    storage.close()


@pytest.fixture
def owner(store: db.Storage) -> db.UserRecord:
    return make_user(store, "owner")


@pytest.fixture
def client(store: db.Storage, tmp_path: Path) -> Iterator[TestClient]:
    """The share routes behind the real guard, as `app_kwargs` installs them."""
    settings = Settings(model="tiny", data_dir=tmp_path / "data")
    settings.temp_dir.mkdir(parents=True, exist_ok=True)
    kwargs = app_kwargs(settings, photo_exists=stored_photo_lookup(store), routes=share_routes(store))
    app = Starlette(lifespan=kwargs["lifespan"])
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as test_client:
        yield test_client


def make_user(storage: db.Storage, name: str) -> db.UserRecord:
    with storage.session() as session:
        return db.user_for_browser_secret(session, secret=f"secret-of-{name}-0123456789abcdef")


def png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buffer, "JPEG")
    return buffer.getvalue()


def share(storage: db.Storage, owner: db.UserRecord, *, title: str, question: str, reply: str,
          photo: bytes | None = None, reply_status: db.MessageStatus = db.MessageStatus.COMPLETE) -> Shared:
    """A conversation of one question (with `photo`) and one reply, shared by link."""
    sha256 = db.save_image(storage, photo).sha256 if photo is not None else None
    with storage.session() as session:
        conversation = db.create_conversation(session, owner_id=owner.id, title=title)
        db.add_user_message(session, owner_id=owner.id, conversation_id=conversation.id, text=question,
                            image_sha256=sha256)
        answer = db.start_assistant_message(session, owner_id=owner.id, conversation_id=conversation.id)
        db.update_assistant_message(session, owner_id=owner.id, message_id=answer.id, text=reply,
                                    status=reply_status)
        record = db.share_conversation(session, owner_id=owner.id, conversation_id=conversation.id)
    return Shared(token=record.token, conversation_id=conversation.id, photo_sha256=sha256)


def storage_error(storage: db.Storage, token: str) -> db.NotFoundError:
    """What storage says about `token`: the sentence the page must show."""
    with storage.session() as session, pytest.raises(db.NotFoundError) as raised:
        db.shared_conversation(session, token=token)
    return raised.value


class Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {name: value or "" for name, value in attrs}))

    def named(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.tags if name == tag]


def assert_not_cached(response: httpx.Response) -> None:
    assert response.headers["cache-control"] == "no-store", response.url
    assert response.headers["x-robots-tag"] == "noindex", response.url


def assert_no_leak(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, leak


def test_the_page_shows_title_question_photo_and_reply(client, store, owner):
    shared = share(store, owner, title="Cats on the sofa", question="What is **this** animal?",
                   reply="A *cat*, sleeping.", photo=png("orange"))
    response = client.get(f"/share/{shared.token}")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert_not_cached(response)
    page = response.text
    assert "<h1>Cats on the sofa</h1>" in page
    assert "What is <strong>this</strong> animal?" in page and "A <em>cat</em>, sleeping." in page
    assert "Shared read-only from Mipha Chat · <time" in page
    (photo,) = Tags(page).named("img")
    assert photo["src"] == f"{shared.token}/photo/{shared.photo_sha256}" and photo["alt"] == "photo"
    assert page.index("What is") < page.index("A <em>cat</em>")


def test_the_page_is_one_plain_document_for_phones_and_screen_readers(client, store, owner):
    shared = share(store, owner, title="Layout", question="# Big heading\nq", reply="## Smaller\nr")
    page = client.get(f"/share/{shared.token}").text
    tags = Tags(page)
    assert tags.named("html") == [{"lang": "en"}]
    assert len(tags.named("h1")) == 1 and len(tags.named("main")) == 1
    assert "<h3>Big heading</h3>" in page and "<h3>Smaller</h3>" in page  # below the h2 of each message
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in tags.named("meta")
    assert tags.named("link") == [{"rel": "stylesheet", "href": "assets/share.css"}]
    assert not tags.named("script") and not tags.named("style")
    assert not any("style" in attrs for _, attrs in tags.tags)
    css = client.get("/share/assets/share.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "prefers-color-scheme: dark" in css.text and "max-width: 100%" in css.text


def test_hostile_title_and_messages_are_shown_as_text(client, store, owner):
    shared = share(store, owner, title=HOSTILE_TITLE, question="\n\n".join(HOSTILE_TEXTS),
                   reply="\n\n".join(reversed(HOSTILE_TEXTS)), photo=png("green"))
    page = client.get(f"/share/{shared.token}").text
    tags = Tags(page)
    assert not tags.named("script") and not tags.named("iframe") and not tags.named("style")
    assert [attrs for _, attrs in tags.tags if any(name.startswith("on") for name in attrs)] == []
    assert [img["src"] for img in tags.named("img")] == [f"{shared.token}/photo/{shared.photo_sha256}"]
    assert all(a.get("href", "https://").startswith(("http://", "https://")) for a in tags.named("a"))
    assert not [value for _, attrs in tags.tags for value in attrs.values() if "javascript:" in value.lower()]
    assert f"<h1>{html.escape(HOSTILE_TITLE)}</h1>" in page
    assert page.count("&lt;script&gt;alert(3)&lt;/script&gt;") == 2  # shown, not dropped
    assert "[image: tracker]" in page
    assert len(tags.named("h1")) == 1 and len(tags.named("h3")) == 2  # the message's "#" sits below "Question"


def test_a_reply_being_written_shows_its_text_so_far(client, store, owner):
    writing = share(store, owner, title="Live", question="Tell me a story", reply="Once upon a",
                    reply_status=db.MessageStatus.PARTIAL)
    done = share(store, owner, title="Done", question="Hi", reply="Hello there.")
    page = client.get(f"/share/{writing.token}").text
    assert "Once upon a" in page and "(still being written)" in page
    assert "(still being written)" not in client.get(f"/share/{done.token}").text


def test_a_link_turned_off_says_so_at_once(client, store, owner):
    shared = share(store, owner, title="Soon private", question="Secret question", reply="Secret reply",
                   photo=png("purple"))
    assert client.get(f"/share/{shared.token}").status_code == 200
    with store.session() as session:
        assert db.revoke_share(session, owner_id=owner.id, conversation_id=shared.conversation_id)
    error = storage_error(store, shared.token)
    assert isinstance(error, db.ShareRevokedError)
    response = client.get(f"/share/{shared.token}")
    assert response.status_code == 410 and html.escape(str(error)) in response.text
    assert "Secret" not in response.text and not Tags(response.text).named("img")
    assert_not_cached(response)
    photo = client.get(f"/share/{shared.token}/photo/{shared.photo_sha256}")
    assert photo.status_code == 410 and photo.content != png("purple")
    assert_not_cached(photo)


def test_unknown_and_garbage_links_answer_404_without_details(client, store, owner):
    share(store, owner, title="Someone's", question="Their question", reply="Their reply")
    unknown = "Z" * 32
    response = client.get(f"/share/{unknown}")
    assert response.status_code == 404
    assert html.escape(str(storage_error(store, unknown))) in response.text
    assert_not_cached(response)
    for token in GARBAGE_TOKENS:
        response = client.get(f"/share/{token}")
        assert response.status_code == 404, token
        tags = Tags(response.text)
        assert "Their" not in response.text and not tags.named("script") and not tags.named("img"), token
        assert not [attrs for _, attrs in tags.tags if any(name.startswith("on") for name in attrs)], token
        assert_no_leak(response.text)
        photo = client.get(f"/share/{token}/photo/{'0' * 64}")
        assert photo.status_code == 404, token
        assert_no_leak(photo.text)


def test_a_photo_is_served_only_through_the_link_of_its_conversation(client, store, owner):
    shared = share(store, owner, title="Mine", question="q", reply="r", photo=png("red"))
    jpeg_shared = share(store, owner, title="JPEG", question="q", reply="r", photo=jpeg("yellow"))
    other = share(store, owner, title="Also mine", question="q", reply="r", photo=png("blue"))
    stranger = share(store, make_user(store, "stranger"), title="Theirs", question="q", reply="r",
                     photo=png("black"))

    photo = client.get(f"/share/{shared.token}/photo/{shared.photo_sha256}")
    assert photo.status_code == 200 and photo.headers["content-type"] == "image/png"
    assert photo.content == db.image_path(store, shared.photo_sha256).read_bytes()
    assert_not_cached(photo)
    photo = client.get(f"/share/{jpeg_shared.token}/photo/{jpeg_shared.photo_sha256}")
    assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"

    for sha256 in (other.photo_sha256, stranger.photo_sha256, "0" * 64, "x" * 500):
        response = client.get(f"/share/{shared.token}/photo/{sha256}")
        assert response.status_code == 404, sha256
        assert not response.headers["content-type"].startswith("image/"), sha256
        assert_no_leak(response.text)
        assert_not_cached(response)
    assert client.get(f"/share/{shared.token}/photo/..%2F..%2Fmipha.sqlite3").status_code == 404


def test_only_get_and_head_are_answered(client, store, owner):
    shared = share(store, owner, title="Read only", question="q", reply="r", photo=png("white"))
    head = client.head(f"/share/{shared.token}")
    assert head.status_code == 200 and head.content == b""
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in (f"/share/{shared.token}", f"/share/{shared.token}/photo/{shared.photo_sha256}"):
            response = client.request(method, path)
            assert response.status_code == 405, (method, path)
            assert "Read only" not in response.text


def test_the_guard_secures_the_page(client, store, owner):
    shared = share(store, owner, title="Headers", question="q", reply="r")
    response = client.get(f"/share/{shared.token}")
    policy = {name: values for name, *values in (d.split() for d in response.headers["content-security-policy"]
                                                 .split(";") if d.strip())}
    assert policy["script-src"] == ["'self'"] and policy["img-src"][0] == "'self'"
    assert "'self'" in policy["style-src"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert client.get(f"/share/{shared.token}", headers={"Origin": "https://evil.example"}).status_code == 403


def test_routes_come_before_gradio_and_need_the_login_under_auth(tmp_path: Path):
    """A real Gradio app with `--auth`: without the login cookie 401, with it the page."""
    import gradio as gr

    data_dir = tmp_path / "data"
    settings = Settings(model="tiny", data_dir=data_dir, port=free_port(), auth=(Credential("alice", "pw"),))
    settings.temp_dir.mkdir(parents=True, exist_ok=True)
    store = db.open_storage(db.StorageConfig(data_dir=data_dir))
    shared = share(store, make_user(store, "alice"), title="Through Gradio", question="q", reply="r",
                   photo=png("teal"))
    with gr.Blocks() as demo:
        gr.Markdown("Mipha")
    _, url, _ = demo.launch(
        prevent_thread_lock=True, quiet=True, server_name=settings.host, server_port=settings.port,
        auth=[("alice", "pw")],
        app_kwargs=app_kwargs(settings, photo_exists=stored_photo_lookup(store), routes=share_routes(store)))
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get(f"/share/{shared.token}").status_code == 401
            assert http.post("/login", data={"username": "alice", "password": "pw"}).status_code == 200
            page = http.get(f"/share/{shared.token}")
            assert page.status_code == 200 and "<h1>Through Gradio</h1>" in page.text
            assert_not_cached(page)
            photo = http.get(f"/share/{shared.token}/photo/{shared.photo_sha256}")
            assert photo.status_code == 200 and photo.headers["content-type"] == "image/png"
            assert http.get("/share/assets/share.css").status_code == 200
            assert http.get("/share/unknown-token").status_code == 404
    finally:
        demo.close()
        store.close()


@pytest.mark.skipif("share_routes(" not in inspect.getsource(launch),
                    reason="launch.py does not pass share_routes(storage) to app_kwargs yet")
def test_the_real_server_serves_a_shared_page(tmp_path: Path):
    data_dir = tmp_path / "data"
    store = db.open_storage(db.StorageConfig(data_dir=data_dir))
    try:
        shared = share(store, make_user(store, "owner"), title="Through launch.py", question="What is this?",
                       reply="A photo.", photo=jpeg("navy"))
    finally:
        store.close()  # the server takes the data directory's lock
    with running_app(data_dir, name="share-page") as app, httpx.Client(base_url=app.url, timeout=30) as http:
        page = http.get(f"share/{shared.token}")
        assert page.status_code == 200 and "<h1>Through launch.py</h1>" in page.text
        assert "A photo." in page.text and page.headers["x-content-type-options"] == "nosniff"
        assert_not_cached(page)
        photo = http.get(f"share/{shared.token}/photo/{shared.photo_sha256}")
        assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
        assert http.get(f"share/{'A' * 500}").status_code == 404
