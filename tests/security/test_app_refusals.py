"""Refusals a hostile or unlucky visitor meets: clear, one sentence, and nothing of theirs lost.

Handlers on the tiny model and a real SQLite data dir (the fixtures in tests/conftest.py).
Expected refusals raise `Refused` and reach the page as a notice by the composer that keeps the
text and photo; only the unexpected becomes Gradio's error, as one generic sentence.
"""

from __future__ import annotations

import logging
import random
import shutil
import sqlite3
import string
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pytest

import storage as db
from app.events import UNEXPECTED_FAILURE, Refused, owned, owned_stream
from app.handlers import Handlers
from app.model_slot import ModelSlot, ModelState
from app.page_view import KEEP, Notice, PageView
from app.services import Services
from app.settings import Settings
from mipha_core import GenerationParams
from storage import StorageConfig, open_storage
from tests.test_app_handlers import new_visitor

ASSETS = Path(__file__).resolve().parents[2] / "assets"
PARAMS = (0.0, 1.0, 24)


@pytest.fixture
def h(app_services) -> Handlers:
    long_messages = replace(app_services.settings, max_message_chars=20_000)
    return Handlers(replace(app_services, settings=long_messages))


@pytest.fixture
def owner(h) -> int:
    return new_visitor(h)


@pytest.fixture
def upload_dir(tmp_path, monkeypatch) -> Path:
    """Gradio's upload folder, as Gradio finds it (GRADIO_TEMP_DIR)."""
    folder = tmp_path / "gradio-uploads"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def uploaded(upload_dir: Path, name: str = "chelsea.jpg") -> Path:
    """A photo as Gradio leaves an upload: in a folder of its own under the upload folder."""
    target = upload_dir / "a1b2c3" / name
    target.parent.mkdir()
    shutil.copyfile(ASSETS / name, target)
    return target


def send(h: Handlers, owner: int, text: str, *, files=(), conversation: str | None = None,
         params=PARAMS) -> PageView:
    """Send as the page does; the reply goes on as a job (the fixtures stop it at the end)."""
    return h.send(owner, {"text": text, "files": [{"path": str(f)} for f in files]}, conversation, None, *params)


def request() -> gr.Request:
    return gr.Request(username=None, cookies={})


def shown(view: PageView):
    """`render` for `owned`: the view itself, so a test reads what the page would get."""
    return view


def conversations(h: Handlers, owner: int) -> list:
    with h.storage.session() as s:
        return db.list_conversations(s, owner_id=owner)


def test_a_question_that_cannot_fit_is_refused_before_anything_is_stored(h, owner, upload_dir):
    photo = uploaded(upload_dir)
    rng = random.Random(0)
    text = "".join(rng.choice(string.ascii_letters + " ") for _ in range(12_000))
    with pytest.raises(Refused, match="still in the box") as refused:
        send(h, owner, text, files=[photo])
    assert "token" in refused.value.notice.text and refused.value.notice.kind == "error"
    assert conversations(h, owner) == []  # nothing stored, no conversation created
    assert photo.is_file()  # the photo stays attached, so sending a shorter question works
    view = owned(lambda *_: owner, h.send, render=shown)(
        request(), None, {"text": text, "files": [{"path": str(photo)}]}, None, None, *PARAMS)
    assert "still in the box" in view.notice.text and view.composer is KEEP  # the box keeps text and photo
    sent = send(h, owner, text[:200], files=[photo])
    assert sent.conversation_id and sent.composer == "clear"


def test_the_original_upload_is_deleted_once_the_cleaned_photo_is_stored(h, owner, upload_dir):
    photo = uploaded(upload_dir)
    conversation = send(h, owner, "What is this?", files=[photo]).conversation_id
    assert not photo.exists() and not photo.parent.exists()
    with h.storage.session() as s:
        message = db.list_messages(s, owner_id=owner, conversation_id=conversation)[0]
    assert db.image_path(h.storage, message.image_sha256).is_file()


def test_a_file_outside_the_upload_folder_is_never_deleted(h, owner, upload_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere.jpg"
    shutil.copyfile(ASSETS / "coffee.jpg", elsewhere)
    assert send(h, owner, "and this?", files=[elsewhere]).conversation_id
    assert elsewhere.is_file()


def test_a_refused_photo_is_not_kept_either(h, owner, upload_dir):
    broken = upload_dir / "d4e5f6" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes((ASSETS / "coffee.jpg").read_bytes()[:300])
    with pytest.raises(Refused, match="not a photo this app can read"):
        send(h, owner, "what is this?", files=[broken])
    assert not broken.exists()
    assert conversations(h, owner) == []


def test_a_lone_surrogate_is_stored_as_a_replacement_character(h, owner):
    sent = send(h, owner, "half an emoji \ud83d here")
    with h.storage.session() as s:
        message = db.list_messages(s, owner_id=owner, conversation_id=sent.conversation_id)[0]
    assert message.text == "half an emoji \ufffd here"
    assert "half an emoji \ufffd here" in sent.messages[0]["content"]
    renamed = h.rename(owner, sent.conversation_id, "title \udc00")
    assert renamed.title == "title \ufffd"
    assert len(h.search(owner, "\ud800", None).conversations.choices) == 1  # searched as U+FFFD, no failure
    assert conversations(h, owner)[0].title == "title \ufffd"


def test_generation_settings_from_the_page_are_bounded(h, owner):
    assert GenerationParams.clamped(float("nan"), 1.0, 24, limit=64) == GenerationParams(max_new_tokens=64)
    assert GenerationParams.clamped(9.0, -1, 10**9, limit=64) == GenerationParams(
        temperature=2.0, top_p=0.05, max_new_tokens=64)
    assert GenerationParams.clamped("x", None, "y", limit=64) == GenerationParams(max_new_tokens=64)
    sent = send(h, owner, "hi", params=(9.0, -1, 10**9))  # what a hostile client can send for the sliders
    list(h.attach(owner, sent.conversation_id))
    assert h.open(owner, sent.conversation_id).params == GenerationParams(temperature=2.0, top_p=0.05,
                                                                          max_new_tokens=64)
    h.remember_settings(owner, sent.conversation_id, float("inf"), "x", None)
    assert h.open(owner, sent.conversation_id).params == GenerationParams(max_new_tokens=64)


def test_an_unexpected_failure_shows_one_sentence_and_logs_the_details(h, caplog):
    def broken(owner_id, *_values):
        raise RuntimeError("(sqlite3.OperationalError) SELECT * FROM users WHERE path='/srv/data/mipha.sqlite3'")

    event = owned(lambda *_: 1, broken, render=shown)
    with caplog.at_level(logging.ERROR), pytest.raises(gr.Error) as raised:
        event(request(), None)
    assert raised.value.message == UNEXPECTED_FAILURE
    assert "SELECT" in caplog.text and "Traceback" in caplog.text


def test_an_unexpected_failure_while_a_reply_streams_is_one_sentence_too(h, caplog):
    def broken(owner_id, *_values):
        yield PageView(busy=True)
        raise KeyError("/srv/data/mipha.sqlite3")

    views = owned_stream(lambda *_: 1, broken, render=shown)(request(), None)
    assert next(views) == PageView(busy=True)
    with caplog.at_level(logging.ERROR):
        last = next(views)
    # a notice, not an overlay, and the page is idle again: Send works, Stop is off
    assert last == PageView(notice=Notice(UNEXPECTED_FAILURE), busy=False)
    assert "mipha.sqlite3" in caplog.text and "mipha.sqlite3" not in last.notice.text


def test_a_refusal_is_a_notice_by_the_composer_not_an_error(h, owner):
    view = owned(lambda *_: owner, h.send, render=shown)(request(), None, {"text": "", "files": []}, None, None,
                                                           *PARAMS)
    assert view == PageView(notice=view.notice)  # nothing else changes: the text stays in the box
    assert "Type a question" in view.notice.text and view.notice.kind == "warning"


def test_storage_errors_reach_the_person_as_their_own_sentence(h, owner):
    event = owned(lambda *_: owner, h.open, render=shown)
    view = event(request(), None, "no-such-conversation")
    assert view == PageView(notice=view.notice) and "was not found" in view.notice.text
    stream = owned_stream(lambda *_: owner, h.attach, render=shown)
    assert list(stream(request(), None, "no-such-conversation")) == [PageView()]  # nothing to follow


def test_any_model_load_failure_ends_the_loading_state():
    slot = ModelSlot("tiny")

    def assertion_from_torch():
        raise AssertionError("Torch not compiled with CUDA enabled")

    slot.load_in_background(assertion_from_torch).join(timeout=10)
    status = slot.status()
    assert status.state is ModelState.FAILED
    assert "--device cpu" in status.message and "AssertionError" not in status.message


def test_a_database_held_by_someone_else_is_one_sentence_and_loses_nothing(app_tiny_engine, tmp_path):
    settings = Settings(model="tiny", data_dir=tmp_path, max_new_tokens=64)
    with closing(open_storage(StorageConfig(data_dir=tmp_path, busy_timeout_ms=200))) as storage:
        services = Services(settings=settings, storage=storage, model=ModelSlot.ready(app_tiny_engine))
        try:
            h = Handlers(services)
            owner = new_visitor(h)
            event = owned(lambda *_: owner, h.send, render=shown)
            question = {"text": "still there?", "files": []}
            holder = sqlite3.connect(tmp_path / "mipha.sqlite3", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # another process writing, past the busy timeout
            try:
                refused = event(request(), None, question, None, None, *PARAMS)
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            assert refused == PageView(notice=refused.notice)  # the question stays in the box
            message = refused.notice.text
            assert "busy" in message and "try again" in message
            assert not any(word in message for word in ("sqlite", "SELECT", "INSERT", "Error", "/"))
            sent = event(request(), None, question, None, None, *PARAMS)  # then it works
            assert sent.conversation_id and sent.composer == "clear"
            assert list(h.attach(owner, sent.conversation_id))[-1].busy is False
        finally:
            services.replies.close()
