"""Refusals a hostile or unlucky visitor meets: clear, one sentence, and nothing of theirs lost.

Handlers on the tiny model and a real SQLite data dir (the fixtures in tests/conftest.py).
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
from app.events import UNEXPECTED_FAILURE, owned
from app.handlers import GenerationSettings, Handlers
from app.model_slot import ModelSlot, ModelState
from app.services import Services
from app.settings import Settings
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


def conversations(h: Handlers, owner: int) -> list:
    with h.storage.session() as s:
        return db.list_conversations(s, owner_id=owner)


def test_a_question_that_cannot_fit_is_refused_before_anything_is_stored(h, owner, upload_dir):
    photo = uploaded(upload_dir)
    rng = random.Random(0)
    text = "".join(rng.choice(string.ascii_letters + " ") for _ in range(12_000))
    with pytest.raises(gr.Error, match="still in the box") as refused:
        h.submit(owner, {"text": text, "files": [{"path": str(photo)}]}, None, *PARAMS)
    assert "token" in str(refused.value.message)
    assert conversations(h, owner) == []  # nothing stored, no conversation created
    assert photo.is_file()  # the photo stays attached, so sending a shorter question works
    conversation, _ = h.submit(owner, {"text": text[:200], "files": [{"path": str(photo)}]}, None, *PARAMS)
    assert conversation


def test_the_original_upload_is_deleted_once_the_cleaned_photo_is_stored(h, owner, upload_dir):
    photo = uploaded(upload_dir)
    conversation, _ = h.submit(owner, {"text": "What is this?", "files": [{"path": str(photo)}]}, None, *PARAMS)
    assert not photo.exists() and not photo.parent.exists()
    with h.storage.session() as s:
        (message,) = db.list_messages(s, owner_id=owner, conversation_id=conversation)
    assert db.image_path(h.storage, message.image_sha256).is_file()


def test_a_file_outside_the_upload_folder_is_never_deleted(h, owner, upload_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere.jpg"
    shutil.copyfile(ASSETS / "coffee.jpg", elsewhere)
    h.submit(owner, {"text": "and this?", "files": [{"path": str(elsewhere)}]}, None, *PARAMS)
    assert elsewhere.is_file()


def test_a_refused_photo_is_not_kept_either(h, owner, upload_dir):
    broken = upload_dir / "d4e5f6" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes((ASSETS / "coffee.jpg").read_bytes()[:300])
    with pytest.raises(gr.Error, match="not a photo this app can read"):
        h.submit(owner, {"text": "what is this?", "files": [{"path": str(broken)}]}, None, *PARAMS)
    assert not broken.exists()


def test_a_lone_surrogate_is_stored_as_a_replacement_character(h, owner):
    conversation, shown = h.submit(owner, {"text": "half an emoji \ud83d here", "files": []}, None, *PARAMS)
    with h.storage.session() as s:
        (message,) = db.list_messages(s, owner_id=owner, conversation_id=conversation)
    assert message.text == "half an emoji \ufffd here"
    h.rename(owner, conversation, "title \udc00")
    assert len(h.conversation_list(owner, "\ud800")["choices"]) == 1  # searched as U+FFFD, no failure
    assert conversations(h, owner)[0].title == "title \ufffd"


def test_generation_settings_from_the_page_are_bounded(h):
    assert GenerationSettings.bounded(float("nan"), 1.0, 24, limit=64) == GenerationSettings(max_new_tokens=64)
    assert GenerationSettings.bounded(9.0, -1, 10**9, limit=64) == GenerationSettings(2.0, 0.05, 64)
    assert GenerationSettings.bounded("x", None, "y", limit=64) == GenerationSettings(max_new_tokens=64)


def test_an_unexpected_failure_shows_one_sentence_and_logs_the_details(h, caplog):
    def broken(owner_id, *_values):
        raise RuntimeError("(sqlite3.OperationalError) SELECT * FROM users WHERE path='/srv/data/mipha.sqlite3'")

    event = owned(lambda *_: 1, broken)
    with caplog.at_level(logging.ERROR), pytest.raises(gr.Error) as shown:
        event(None, None)
    assert shown.value.message == UNEXPECTED_FAILURE
    assert "SELECT" in caplog.text and "Traceback" in caplog.text


def test_storage_errors_reach_the_person_as_their_own_sentence(h, owner):
    event = owned(lambda *_: owner, h.open_conversation)
    with pytest.raises(gr.Error, match="was not found"):
        event(gr.Request(username=None, cookies={}), None, "no-such-conversation")


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
        h = Handlers(Services(settings=settings, storage=storage, model=ModelSlot.ready(app_tiny_engine)))
        owner = new_visitor(h)
        holder = sqlite3.connect(tmp_path / "mipha.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process writing, past the busy timeout
        try:
            with pytest.raises(gr.Error) as refused:
                h.submit(owner, {"text": "still there?", "files": []}, None, *PARAMS)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        message = refused.value.message
        assert "busy" in message and "try again" in message
        assert not any(word in message for word in ("sqlite", "SELECT", "INSERT", "Error", "/"))
        conversation, _ = h.submit(owner, {"text": "still there?", "files": []}, None, *PARAMS)  # then it works
        assert conversation
