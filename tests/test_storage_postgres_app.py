"""The real app on PostgreSQL: two servers, two data directories, one database.

A visitor asks about a photo on one server; the question, the reply and the photo are stored in
PostgreSQL; the same visitor finds the conversation on the other server and that server serves
the photo (from the database, not from the first server's disk). Once the conversation is
deleted, neither serves the photo any more.
"""

from __future__ import annotations

import re
import secrets
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

import storage as st
from app.visitor import COOKIE_NAME
from tests.app_process import running_app
from tests.security.gradio_protocol import chained, data_for, dependency, output_of, run_event
from tests.storage_helpers import textured_image

pytestmark = pytest.mark.slow

PARAMS = {"Temperature": 0.0, "Top-p": 1.0, "Max new tokens": 16}


def photo_jpeg(path: Path) -> Path:
    textured_image((96, 64), seed=7).save(path, "JPEG", quality=90)
    return path


def ask_with_photo(url: str, photo: Path, question: str) -> tuple[str, list]:
    """Send the question with the photo as the page does and follow the reply; returns the visitor
    cookie and the chat the page shows."""
    with closing(httpx.Client(base_url=url, timeout=180)) as client:
        client.get("")  # the visitor cookie is set here
        config = client.get("config").json()
        with photo.open("rb") as f:
            (uploaded,) = client.post("gradio_api/upload", files={"files": (photo.name, f, "image/jpeg")}).json()
        session = secrets.token_hex(6)
        ask = dependency(config, elem_id="chat-input", event="submit")
        message = {"text": question,
                   "files": [{"path": uploaded, "orig_name": photo.name, "meta": {"_type": "gradio.FileData"}}]}
        asked = run_event(client, ask, data_for(config, ask, {"chat-input": message, **PARAMS}),
                          session_hash=session, timeout=180)
        assert asked.get("success") is True, asked
        reply = chained(config, after=ask)
        replied = run_event(client, reply, data_for(config, reply, {}), session_hash=session, timeout=180)
        assert replied.get("success") is True, replied
        return client.cookies[COOKIE_NAME], output_of(config, reply, replied, "chatbot")


def open_on(url: str, cookie: str) -> tuple[httpx.Client, list, list]:
    """The visitor's conversation list on another server, and the first conversation opened there."""
    client = httpx.Client(base_url=url, timeout=180, cookies={COOKIE_NAME: cookie})
    client.get("")
    config = client.get("config").json()
    session = secrets.token_hex(6)
    listing = dependency(config, elem_id="search-box", event="change")
    listed = run_event(client, listing, data_for(config, listing, {"search-box": ""}), session_hash=session)
    choices = output_of(config, listing, listed, "conversation-list")["choices"]
    opening = dependency(config, elem_id="conversation-list", event="input")
    opened = run_event(client, opening, data_for(config, opening, {"conversation-list": choices[0][1]}),
                       session_hash=session)
    assert opened.get("success") is True, opened
    return client, choices, output_of(config, opening, opened, "chatbot")


@pytest.mark.timeout(600)
def test_two_app_servers_on_one_postgresql_database_share_conversations_and_photos(
    tmp_path: Path, postgres_empty_database: str
) -> None:
    url = postgres_empty_database
    photo = photo_jpeg(tmp_path / "bird.jpg")
    question = f"What is in this photo? {secrets.token_hex(3)}"
    with running_app(tmp_path / "first", "--database-url", url, name="postgres-first") as first:
        cookie, shown_on_first = ask_with_photo(first.url, photo, question)
        assert [m["role"] for m in shown_on_first] == ["user", "user", "assistant"]  # photo, question, reply

        checker = st.open_storage(st.StorageConfig(data_dir=tmp_path / "checker", database_url=url))
        with checker.session() as session:
            owner = st.user_for_browser_secret(session, secret=cookie)
            (conversation,) = st.list_conversations(session, owner_id=owner.id)
            asked, answered = st.list_messages(session, owner_id=owner.id, conversation_id=conversation.id)
        assert asked.text == question and asked.image_sha256 is not None
        assert answered.status is st.MessageStatus.COMPLETE and answered.text
        with checker.engine.connect() as connection:
            stored = connection.execute(text("SELECT data FROM image_blobs WHERE sha256 = :s"),
                                        {"s": asked.image_sha256}).scalar_one()

        # a second server, on its own data directory, while the first one keeps running
        with running_app(tmp_path / "second", "--database-url", url, name="postgres-second") as second:
            client, choices, shown_on_second = open_on(second.url, cookie)
            with closing(client):
                assert [conversation_id for _, conversation_id in choices] == [conversation.id]
                # the random reply may hold control characters, which the shown message's repr escapes
                visible = max(re.findall(r"[^\x00-\x1f\x7f]+", answered.text[:40]), key=len)
                assert question in str(shown_on_second[1]) and visible in str(shown_on_second[2])
                photo_file = shown_on_second[0]["content"][0]["file"]["path"]
                assert asked.image_sha256 in photo_file
                cached = tmp_path / "second" / "images" / asked.image_sha256[:2] / f"{asked.image_sha256}.jpg"
                assert cached.read_bytes() == stored  # written into its own data dir from the database
                served = client.get(f"gradio_api/file={photo_file}")
                assert served.status_code == 200 and served.content == stored  # the cleaned photo, from PostgreSQL

                with checker.session() as session:  # deleted, as if on the first server
                    st.delete_conversation(session, owner_id=owner.id, conversation_id=conversation.id)
                assert client.get(f"gradio_api/file={photo_file}").status_code != 200
        checker.close()
