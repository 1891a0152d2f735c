"""Handlers as plain functions: the tiny model on CPU and a real SQLite file, no browser."""

from __future__ import annotations

import random
import secrets
import string
import threading
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pytest

import storage as db
from app.handlers import Handlers
from app.model_slot import ModelSlot
from app.views import model_messages

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PARAMS = (0.0, 1.0, 24)  # temperature, top_p, max_new_tokens: greedy and short


@pytest.fixture
def h(app_services) -> Handlers:
    return Handlers(app_services)


@pytest.fixture
def owner(h) -> int:
    return new_visitor(h)


def new_visitor(h: Handlers) -> int:
    """The owner id of a browser seen for the first time (a fresh visitor cookie)."""
    return h.owner(secrets.token_urlsafe(32), username=None, oauth_username=None)


def photo(name: str = "chelsea.jpg") -> dict:
    return {"path": str(ASSETS / name)}


def ask(h: Handlers, owner: int, text: str, *, conversation: str | None = None, files=()) -> tuple[str, list]:
    conversation, shown = h.submit(owner, {"text": text, "files": list(files)}, conversation, *PARAMS)
    frames = list(h.reply(owner, conversation, *PARAMS))
    return conversation, frames


def stored(h: Handlers, owner: int, conversation: str) -> list[db.MessageRecord]:
    with h.storage.session() as s:
        return db.list_messages(s, owner_id=owner, conversation_id=conversation)


def test_identity_is_per_browser_secret_and_per_login(h):
    secret = secrets.token_urlsafe(32)
    first = h.owner(secret, username=None, oauth_username=None)
    assert h.owner(secret, username=None, oauth_username=None) == first
    assert new_visitor(h) != first
    assert h.owner("too-short", username=None, oauth_username=None) is None
    assert h.owner(secret, username=None, oauth_username="ada-hf") != first  # OAuth account over browser


def test_with_a_login_required_only_the_login_name_counts(app_services):
    from app.settings import Credential

    services = replace(app_services, settings=replace(app_services.settings, auth=(Credential("ada", "pw"),)))
    h = Handlers(services)
    secret = secrets.token_urlsafe(32)
    ada = h.owner(secret, username="ada", oauth_username=None)
    assert ada == h.owner(None, username="ada", oauth_username=None)  # the browser's identity plays no part
    assert h.owner(secret, username=None, oauth_username=None) is None  # no login: no one, whatever it sends
    assert h.owner(secret, username="bob", oauth_username=None) != ada


def test_question_with_photo_streams_and_persists(h, owner):
    conversation, frames = ask(h, owner, "What is in this photo?", files=[photo()])
    assert len(frames) >= 3, "the reply should arrive in several frames, not at once"
    user_photo, user_text, reply = frames[-1]
    assert Path(user_photo["content"]["path"]).is_file()
    assert user_text == {"role": "user", "content": "<p>What is in this photo?</p>"}
    assert "tokens/s" in reply["content"] and "reply-footer" in reply["content"]
    question, answer = stored(h, owner, conversation)
    assert question.image_sha256 and answer.status is db.MessageStatus.COMPLETE
    assert answer.completion_tokens and answer.text.strip()


def test_second_question_reuses_the_cache_and_says_so_in_the_footer(h, owner):
    conversation, first_frames = ask(h, owner, "What is in this photo?", files=[photo()])
    conversation, frames = ask(h, owner, "And what colour is it?", conversation=conversation)
    first, second = stored(h, owner, conversation)[1::2]
    assert not first.reused_tokens and "reused" not in first_frames[-1][-1]["content"]
    assert 0 < second.reused_tokens < second.prompt_tokens
    footer = frames[-1][-1]["content"]
    assert f"{second.reused_tokens} of {second.prompt_tokens} prompt tokens reused" in footer
    assert f"first token {second.first_token_seconds:.1f} s" in footer
    reopened = h.open_conversation(owner, conversation)[1]
    assert reopened[-1]["content"] == footer  # the footer is rebuilt from what was stored


def test_stop_keeps_the_partial_reply_and_marks_it(h, owner, monkeypatch):
    conversation, _ = h.submit(owner, {"text": "Tell me a long story", "files": []}, None, 0.0, 1.0, 64)
    frames = h.reply(owner, conversation, 0.0, 1.0, 64)
    next(frames)
    h.stop(owner, conversation)
    rest = list(frames)
    assert "stopped: partial reply" in rest[-1][-1]["content"]
    answer = stored(h, owner, conversation)[-1]
    assert answer.status is db.MessageStatus.CANCELLED and answer.finish_reason == "cancelled"
    assert answer.completion_tokens < 64


def test_closing_the_generator_cancels_generation(h, owner):
    """What Gradio does when the tab closes: the generator is closed mid-reply."""
    conversation, _ = h.submit(owner, {"text": "Hello", "files": []}, None, 0.0, 1.0, 64)
    cancel = h.services.cancels.get(owner, conversation)
    frames = h.reply(owner, conversation, 0.0, 1.0, 64)
    next(frames)
    frames.close()
    assert cancel.is_set()
    assert stored(h, owner, conversation)[-1].status is db.MessageStatus.CANCELLED
    assert not any(t.name == "mipha-generate" and t.is_alive() for t in threading.enumerate())


def test_regenerate_replaces_the_last_reply(h, owner):
    conversation, _ = ask(h, owner, "Describe it", files=[photo()])
    first = stored(h, owner, conversation)[-1]
    shown = h.prepare_regenerate(owner, conversation)
    assert [m["role"] for m in shown] == ["user", "user"]
    list(h.reply(owner, conversation, 0.7, 0.9, 24))
    records = stored(h, owner, conversation)
    assert len(records) == 2 and records[-1].role is db.Role.ASSISTANT
    assert records[-1].created_at > first.created_at


@pytest.mark.parametrize("message, expected", [
    ({"text": "", "files": []}, "Type a question or add a photo"),
    ({"text": "x" * 501, "files": []}, "the limit is 500"),
])
def test_bad_messages_are_refused_with_a_reason(h, owner, message, expected):
    with pytest.raises(gr.Error, match=expected):
        h.submit(owner, message, None, *PARAMS)


def test_non_image_and_corrupt_uploads_are_refused(h, owner, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a photo")
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes((ASSETS / "coffee.jpg").read_bytes()[:300])
    for upload in (text_file, corrupt):
        with pytest.raises(gr.Error, match="not a photo this app can read"):
            h.submit(owner, {"text": "what is this?", "files": [{"path": str(upload)}]}, None, *PARAMS)
    with h.storage.session() as s:
        assert db.list_conversations(s, owner_id=owner) == []


def test_second_photo_is_announced(h, owner, monkeypatch):
    notices = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: notices.append(message))
    conversation, _ = ask(h, owner, "First", files=[photo("chelsea.jpg")])
    h.submit(owner, {"text": "And this?", "files": [photo("coffee.jpg")]}, conversation, *PARAMS)
    assert any("now looks at this photo" in n for n in notices)


def test_long_conversation_warns_that_old_turns_are_dropped(h, owner, monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    rng = random.Random(0)
    conversation = None
    for _ in range(8):  # 8 × 480 random characters (a few hundred tokens each) overflow 2048 positions
        noise = "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(480))
        conversation, _ = ask(h, owner, noise, conversation=conversation)
    assert any("no longer seen by the model" in w for w in warnings)


def test_model_still_loading_and_failed_load_are_explained(app_services, owner):
    loading = Handlers(app_services)
    loading.services.model = ModelSlot("zhumj34/Mipha-3B")
    with pytest.raises(gr.Error, match="still loading"):
        loading.submit(owner, {"text": "hi", "files": []}, None, *PARAMS)
    from mipha_core import ModelLoadError

    def fail():
        raise ModelLoadError("Cannot reach the Hub (offline). Use --model PATH or --model tiny.")

    loading.services.model.load_in_background(fail).join()
    with pytest.raises(gr.Error, match="--model tiny"):
        loading.submit(owner, {"text": "hi", "files": []}, None, *PARAMS)


def test_html_from_users_is_shown_as_text(h, owner):
    conversation, frames = ask(h, owner, "<img src=x onerror=alert(1)> is `<b>` bold?")
    user_text = frames[-1][0]["content"]
    assert user_text == "<p>&lt;img src=x onerror=alert(1)&gt; is <code>&lt;b&gt;</code> bold?</p>"


def test_conversations_are_private_listed_renamed_searched_and_deleted(h, owner):
    conversation, _ = ask(h, owner, "A cat on a sofa", files=[photo()])
    stranger = new_visitor(h)
    assert h.conversation_list(stranger)["choices"] == []
    with pytest.raises(gr.Error, match="was not found"):
        h.open_conversation(stranger, conversation)
    (label, value), = h.conversation_list(owner)["choices"]
    assert value == conversation and label.startswith("A cat on a sofa · ")
    h.rename(owner, conversation, "Chelsea")
    assert h.conversation_list(owner, "chelsea")["choices"][0][1] == conversation
    assert h.conversation_list(owner, "sofa")["choices"][0][1] == conversation  # message text is searched too
    assert h.conversation_list(owner, "giraffe")["choices"] == []
    with pytest.raises(gr.Error):
        h.delete(stranger, conversation)
    engine = h.services.model.engine()
    cached_before = len(engine.kv_cache)
    h.delete(owner, conversation)
    assert h.conversation_list(owner)["choices"] == []
    assert len(engine.kv_cache) == cached_before - 1  # its KV cache is freed with it


def test_generation_settings_are_remembered_per_conversation(h, owner):
    conversation, _ = h.submit(owner, {"text": "hi", "files": []}, None, 0.9, 0.8, 32)
    other, _ = h.submit(owner, {"text": "hello", "files": []}, None, 0.1, 1.0, 48)
    h.remember_settings(owner, conversation, 1.1, 0.7, 32)
    assert h.open_conversation(owner, conversation)[2:5] == (1.1, 0.7, 32)
    assert h.open_conversation(owner, other)[2:5] == (0.1, 1.0, 48)


def test_unanswered_questions_fold_into_the_next_turn():
    def rec(position, role, text, image=None):
        return db.MessageRecord(id=position, conversation_id="c", position=position, role=role, text=text,
                                image_sha256=image, status=db.MessageStatus.COMPLETE, finish_reason=None,
                                prompt_tokens=None, completion_tokens=None, reused_tokens=None,
                                first_token_seconds=None, duration_seconds=None, created_at=None, updated_at=None)

    records = [rec(0, db.Role.USER, "old", "a" * 64), rec(1, db.Role.ASSISTANT, "ok"),
               rec(2, db.Role.USER, "new photo", "b" * 64), rec(3, db.Role.ASSISTANT, ""),
               rec(4, db.Role.USER, "again?")]
    messages = model_messages(records, load_image=lambda sha: sha[0])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": "old"}]  # only the newest photo is sent
    assert messages[2]["content"] == [{"type": "image", "image": "b"}, {"type": "text", "text": "again?"}]
