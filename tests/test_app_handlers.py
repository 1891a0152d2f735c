"""Handlers as plain functions: the tiny model on CPU and a real SQLite file, no browser.

A reply is a job on the server: `send` stores the question and starts it, `attach` follows it
and ends with the stored conversation (the page runs one after the other, see `app.ui.wiring`).
"""

from __future__ import annotations

import json
import random
import re
import secrets
import string
import threading
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import gradio as gr
import pytest

import storage as db
from app.chat_view import model_messages
from app.events import Refused, owned
from app.handlers import Handlers
from app.model_slot import ModelSlot
from app.page_view import KEEP, Editing, PageView
from app.render import render_markdown
from app.replies import ReplyJobs
from mipha_core import GenerationParams

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PARAMS = (0.0, 1.0, 24)  # temperature, top_p, max_new_tokens: greedy and short
CONTROLS = '<div class="message-controls">'


@pytest.fixture
def h(app_handlers) -> Handlers:
    return app_handlers


@pytest.fixture
def owner(h) -> int:
    return new_visitor(h)


def new_visitor(h: Handlers) -> int:
    """The owner id of a browser seen for the first time (a fresh visitor cookie)."""
    return h.owner(secrets.token_urlsafe(32), username=None, oauth_username=None)


def photo(name: str = "chelsea.jpg") -> dict:
    return {"path": str(ASSETS / name)}


def send(h: Handlers, owner: int, text: str, *, conversation: str | None = None, files=(),
         editing: Editing | None = None, params=PARAMS) -> PageView:
    """Send as the page does: the composer's value, the open conversation, the edit, the sliders."""
    return h.send(owner, {"text": text, "files": list(files)}, conversation, editing, *params)


def ask(h: Handlers, owner: int, text: str, *, conversation: str | None = None, files=(),
        params=PARAMS) -> tuple[str, list[PageView]]:
    """Send, then follow the reply to its end; the conversation and every view the page got."""
    sent = send(h, owner, text, conversation=conversation, files=files, params=params)
    return sent.conversation_id, list(h.attach(owner, sent.conversation_id, new_reply=True))


def stored(h: Handlers, owner: int, conversation: str) -> list[db.MessageRecord]:
    with h.storage.session() as s:
        return db.list_messages(s, owner_id=owner, conversation_id=conversation)


def wait_for(condition, *, timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


class _Buttons(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "button":
            classes = (dict(attrs).get("class") or "").split()
            action = next((c.removeprefix("action-") for c in classes if c.startswith("action-")), "")
            message = next((c.removeprefix("message-") for c in classes if re.fullmatch(r"message-\d+", c)), "")
            self.found.append({"action": action, "message": message})


def message_actions(content: str) -> list[tuple[str, int]]:
    """The (action, message id) of every control button in a shown message (what `assets/app.js` sends)."""
    parser = _Buttons()
    parser.feed(content)
    return [(b["action"], int(b["message"])) for b in parser.found if b["action"] and b["message"].isdigit()]


def shown_text(content: str) -> str:
    """A shown message's rendered text, without the controls line under it."""
    return content.split(CONTROLS, 1)[0]


def action(kind: str, message_id: int) -> str:
    return json.dumps({"action": kind, "message": message_id, "n": 1})


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


def test_question_with_photo_streams_and_persists(app_services):
    # a reply long enough (a few seconds on a CPU) to be seen while it grows, even on a fast machine
    h = Handlers(replace(app_services, settings=replace(app_services.settings, max_new_tokens=256)))
    owner = new_visitor(h)
    sent = send(h, owner, "What is in this photo?", files=[photo()], params=(0.0, 1.0, 256))
    assert sent.busy is True and sent.composer == "clear"  # Send waits, Stop works, the box is emptied
    asked_photo, asked_text = sent.messages
    assert Path(asked_photo["content"]["path"]).is_file()
    frames = list(h.attach(owner, sent.conversation_id, new_reply=True))
    *streaming, final = frames
    assert all(view.busy is True for view in streaming) and final.busy is False
    question, answer = stored(h, owner, sent.conversation_id)
    growing = [shown_text(view.messages[-1]["content"]) for view in streaming]
    partial = [text for text in growing if text.startswith("<p>") and text != render_markdown(answer.text)]
    assert partial, f"the reply should be seen while it is written, not only at the end: {growing}"
    user_photo, user_text, reply = final.messages
    assert Path(user_photo["content"]["path"]).is_file()
    assert shown_text(user_text["content"]) == "<p>What is in this photo?</p>"
    assert message_actions(user_text["content"]) == [("edit", question.id)]
    assert "tokens/s" in reply["content"] and "reply-footer" in reply["content"]
    assert question.image_sha256 and answer.status is db.MessageStatus.COMPLETE
    assert answer.completion_tokens and answer.text.strip()
    assert shown_text(reply["content"]) == render_markdown(answer.text)


def test_a_reply_waiting_for_the_model_says_so(app_services):
    """With the model busy elsewhere, the page shows that the reply waits for its turn."""
    h = Handlers(app_services)
    owner = new_visitor(h)
    release = threading.Event()
    h.replies.start((owner, "someone-else"), lambda job: release.wait(30), notice_for=str)  # holds the only slot
    sent = send(h, owner, "Are you there?")
    frames = h.attach(owner, sent.conversation_id, new_reply=True)
    first = next(frames)
    assert first.busy is True and "Waiting for a free turn" in first.messages[-1]["content"]
    release.set()
    final = list(frames)[-1]
    assert final.busy is False and stored(h, owner, sent.conversation_id)[-1].role is db.Role.ASSISTANT


def test_second_question_reuses_the_cache_and_says_so_in_the_footer(h, owner):
    conversation, first_frames = ask(h, owner, "What is in this photo?", files=[photo()])
    conversation, frames = ask(h, owner, "And what colour is it?", conversation=conversation)
    first, second = stored(h, owner, conversation)[1::2]
    assert not first.reused_tokens and "reused" not in first_frames[-1].messages[-1]["content"]
    assert 0 < second.reused_tokens < second.prompt_tokens
    footer = frames[-1].messages[-1]["content"]
    assert f"{second.reused_tokens} of {second.prompt_tokens} prompt tokens reused" in footer
    assert f"first token {second.first_token_seconds:.1f} s" in footer
    reopened = h.open(owner, conversation).messages
    assert reopened[-1]["content"] == footer  # the footer is rebuilt from what was stored


def forget_photo_file(h: Handlers, owner: int, conversation: str) -> None:
    """Remove the conversation's photo file, as if it were lost (a disk swapped, a cleanup gone wrong)."""
    sha256 = next(r.image_sha256 for r in stored(h, owner, conversation) if r.image_sha256)
    db.image_path(h.storage, sha256).unlink()


def test_a_follow_up_does_not_read_the_photo_file_again(h, owner):
    """The KV cache covers the photo: the follow-up decodes nothing, so it needs no file."""
    conversation, _ = ask(h, owner, "What is in this photo?", files=[photo()])
    forget_photo_file(h, owner, conversation)
    conversation, frames = ask(h, owner, "And what colour is it?", conversation=conversation)
    answer = stored(h, owner, conversation)[-1]
    assert not frames[-1].notice.text and answer.status is db.MessageStatus.COMPLETE
    assert answer.reused_tokens > 0 and answer.text.strip()


def test_a_photo_file_gone_when_the_model_must_look_again_is_a_notice(app_services, app_tiny_engine):
    """With every cache off, each reply looks at the photo again (as after the caches let it go,
    or a restart); a file lost by then is a notice, not a failure without a reason."""
    from mipha_core.engine import CacheSettings, Engine

    uncached = Engine(model=app_tiny_engine.model, tokenizer=app_tiny_engine.tokenizer,
                      preprocessor=app_tiny_engine.preprocessor, model_id=app_tiny_engine.model_id,
                      context_length=app_tiny_engine.context_length, image_tokens=app_tiny_engine.image_tokens,
                      caches=CacheSettings(kv_cache_bytes=0, image_feature_bytes=0))
    h = Handlers(replace(app_services, model=ModelSlot.ready(uncached)))
    owner = new_visitor(h)
    conversation, _ = ask(h, owner, "What is in this photo?", files=[photo()])
    forget_photo_file(h, owner, conversation)
    conversation, frames = ask(h, owner, "And what colour is it?", conversation=conversation)
    notice = frames[-1].notice
    assert "is no longer stored" in notice.text and notice.kind == "error" and frames[-1].busy is False
    assert stored(h, owner, conversation)[-1].status is db.MessageStatus.ERROR


def test_stop_keeps_the_partial_reply_and_marks_it(app_services):
    # 1024 tokens: seconds of work, so Stop lands mid-reply (the tiny model wrote 64 in 0.1 s)
    h = Handlers(replace(app_services, settings=replace(app_services.settings, max_new_tokens=1024)))
    owner = new_visitor(h)
    sent = send(h, owner, "Tell me a long story", params=(0.0, 1.0, 1024))
    frames = h.attach(owner, sent.conversation_id, new_reply=True)
    for view in frames:  # until the first words are on the page
        if "<p>" in view.messages[-1]["content"]:
            break
    assert h.stop(owner, sent.conversation_id) == PageView()
    final = list(frames)[-1]
    assert final.busy is False
    assert "stopped: partial reply" in final.messages[-1]["content"]
    answer = stored(h, owner, sent.conversation_id)[-1]
    assert answer.status is db.MessageStatus.CANCELLED and answer.finish_reason == "cancelled"
    assert 0 < answer.completion_tokens < 1024


def test_a_reload_finds_the_reply_still_being_written(h, owner):
    """Closing the page (the listener) does not stop the reply: attaching again picks it up."""
    sent = send(h, owner, "Hello", params=(0.0, 1.0, 64))
    key = (owner, sent.conversation_id)
    first_tab = h.attach(owner, sent.conversation_id, new_reply=True)
    next(first_tab)
    first_tab.close()  # what Gradio does when the tab closes
    reloaded = h.load(owner, sent.conversation_id)
    assert reloaded.conversation_id == sent.conversation_id and reloaded.messages[0]["role"] == "user"
    final = list(h.attach(owner, sent.conversation_id, new_reply=True))[-1]
    assert final.busy is False and not h.replies.running(key)
    answer = stored(h, owner, sent.conversation_id)[-1]
    assert answer.status is db.MessageStatus.COMPLETE and answer.completion_tokens
    assert shown_text(final.messages[-1]["content"]) == render_markdown(answer.text)


def test_a_reply_nobody_follows_stops_after_the_grace_period(app_services):
    """What happens when the tab closes for good: the reply stops and its generation thread ends."""
    replies = ReplyJobs(max_running=1, grace_s=0.3, check_every_s=0.05)
    long_replies = replace(app_services.settings, max_new_tokens=1024)  # seconds of work, far past the grace
    try:
        h = Handlers(replace(app_services, settings=long_replies, replies=replies))
        owner = new_visitor(h)
        sent = send(h, owner, "Hello", params=(0.0, 1.0, 1024))
        job = replies.get((owner, sent.conversation_id))
        listener = h.attach(owner, sent.conversation_id, new_reply=True)
        next(listener)
        listener.close()
        wait_for(lambda: job.done, what="the reply's end")
        assert job.cancel.is_set()
        answer = stored(h, owner, sent.conversation_id)[-1]
        assert answer.status is db.MessageStatus.CANCELLED and answer.completion_tokens < 1024
        wait_for(lambda: not any(t.name == "mipha-generate" and t.is_alive() for t in threading.enumerate()),
                 timeout=10, what="the end of the generation thread")
    finally:
        replies.close()


def test_regenerate_adds_a_new_version_and_keeps_the_old_one(h, owner):
    conversation, _ = ask(h, owner, "Describe it", files=[photo()])
    question, first = stored(h, owner, conversation)[-2:]
    regenerating = h.regenerate(owner, conversation, 0.7, 0.9, 24)
    assert regenerating.busy is True
    assert [m["role"] for m in regenerating.messages] == ["user", "user"]  # the old reply is out of view
    final = list(h.attach(owner, conversation, new_reply=True))[-1]
    records = stored(h, owner, conversation)
    assert [r.id for r in records[:-1]] == [question.id] and records[-1].role is db.Role.ASSISTANT
    second = records[-1]
    assert second.id != first.id and second.sibling_ids == (first.id, second.id)
    reply = final.messages[-1]["content"]
    assert "2/2" in reply and message_actions(reply) == [("switch", first.id)]  # ‹ goes back to the first
    back = h.page_action(owner, conversation, action("switch", first.id))
    assert shown_text(back.messages[-1]["content"]) == render_markdown(first.text)
    assert [r.id for r in stored(h, owner, conversation)] == [question.id, first.id]  # and after a reload
    assert "1/2" in back.messages[-1]["content"]
    assert message_actions(back.messages[-1]["content"]) == [("switch", second.id)]


def test_editing_a_question_makes_a_new_version_and_keeps_the_old_branch(h, owner):
    conversation, _ = ask(h, owner, "What is in this photo?", files=[photo()])
    old_question, old_reply = stored(h, owner, conversation)
    editing = h.page_action(owner, conversation, action("edit", old_question.id))
    assert editing.composer == "What is in this photo?" and editing.editing.message_id == old_question.id
    edited = send(h, owner, "What colour is the cat?", conversation=conversation, editing=editing.editing)
    assert edited.editing is None and edited.composer == "clear"
    list(h.attach(owner, conversation, new_reply=True))
    new_question, new_reply = stored(h, owner, conversation)
    assert new_question.text == "What colour is the cat?" and new_question.id != old_question.id
    assert new_question.image_sha256 == old_question.image_sha256  # the photo goes with the question
    assert new_question.sibling_ids == (old_question.id, new_question.id)
    assert new_reply.status is db.MessageStatus.COMPLETE
    shown = h.open(owner, conversation).messages
    assert ("switch", old_question.id) in message_actions(shown[1]["content"])
    back = h.page_action(owner, conversation, action("switch", old_question.id))
    assert shown_text(back.messages[1]["content"]) == "<p>What is in this photo?</p>"
    assert [r.id for r in stored(h, owner, conversation)] == [old_question.id, old_reply.id]


@pytest.mark.parametrize("message, expected", [
    ({"text": "", "files": []}, "Type a question or add a photo"),
    ({"text": "x" * 501, "files": []}, "the limit is 500"),
])
def test_bad_messages_are_refused_with_a_reason(h, owner, message, expected):
    with pytest.raises(Refused, match=expected):
        h.send(owner, message, None, None, *PARAMS)
    event = owned(lambda *_: owner, h.send, render=lambda view: view)
    shown = event(gr.Request(username=None, cookies={}), None, message, None, None, *PARAMS)
    assert expected in shown.notice.text  # by the composer, which keeps the text
    assert shown.composer is KEEP and shown.messages is KEEP
    with h.storage.session() as s:
        assert db.list_conversations(s, owner_id=owner) == []


def test_non_image_and_corrupt_uploads_are_refused(h, owner, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a photo")
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes((ASSETS / "coffee.jpg").read_bytes()[:300])
    for upload in (text_file, corrupt):
        with pytest.raises(Refused, match="not a photo this app can read") as refused:
            send(h, owner, "what is this?", files=[{"path": str(upload)}])
        assert refused.value.notice.kind == "error"
    with h.storage.session() as s:
        assert db.list_conversations(s, owner_id=owner) == []


def test_second_photo_is_announced(h, owner):
    conversation, frames = ask(h, owner, "First", files=[photo("chelsea.jpg")])
    assert not frames[-1].notice.text
    sent = send(h, owner, "And this?", conversation=conversation, files=[photo("coffee.jpg")])
    assert "now looks at this photo" in sent.notice.text and sent.notice.kind == "info"
    list(h.attach(owner, conversation, new_reply=True))


def test_long_conversation_warns_that_old_turns_are_dropped(h, owner):
    rng = random.Random(0)
    conversation, frames = None, []
    for _ in range(8):  # 8 × 480 random characters (a few hundred tokens each) overflow 2048 positions
        noise = "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(480))
        conversation, frames = ask(h, owner, noise, conversation=conversation)
        if "no longer seen" in frames[-1].context:
            break
    meter = frames[-1].context
    assert "oldest turns are no longer seen by the model" in meter or "oldest turn is no longer seen" in meter
    assert 'class="context-meter full"' in meter
    assert h.open(owner, conversation).context == meter  # the same after a reload


def test_model_still_loading_and_failed_load_are_explained(app_services, owner):
    loading = Handlers(app_services)
    loading.services.model = ModelSlot("zhumj34/Mipha-3B")
    with pytest.raises(Refused, match="still loading"):
        send(loading, owner, "hi")
    from mipha_core import ModelLoadError

    def fail():
        raise ModelLoadError("Cannot reach the Hub (offline). Use --model PATH or --model tiny.")

    loading.services.model.load_in_background(fail).join()
    with pytest.raises(Refused, match="--model tiny"):
        send(loading, owner, "hi")
    with loading.storage.session() as s:
        assert db.list_conversations(s, owner_id=owner) == []


def test_html_from_users_is_shown_as_text(h, owner):
    conversation, frames = ask(h, owner, "<img src=x onerror=alert(1)> is `<b>` bold?")
    user_text = frames[-1].messages[0]["content"]
    assert shown_text(user_text) == "<p>&lt;img src=x onerror=alert(1)&gt; is <code>&lt;b&gt;</code> bold?</p>"


def test_conversations_are_private_listed_renamed_searched_and_deleted(h, owner):
    conversation, frames = ask(h, owner, "A cat on a sofa", files=[photo()])
    assert frames[-1].conversations.selected == conversation
    stranger = new_visitor(h)
    assert h.search(stranger, "", None).conversations.choices == []
    with pytest.raises(db.NotFoundError, match="was not found"):
        h.open(stranger, conversation)
    refused = h.load(stranger, conversation)  # the stranger has the address
    assert refused.conversation_id is None and refused.messages == []
    assert "was not found" in refused.notice.text
    (label, value), = h.search(owner, "", None).conversations.choices
    assert value == conversation and label.startswith("A cat on a sofa · ")
    renamed = h.rename(owner, conversation, "Chelsea")
    assert renamed.title == "Chelsea" and renamed.conversations.choices[0][0].startswith("Chelsea · ")
    assert h.search(owner, "chelsea", conversation).conversations.choices[0][1] == conversation
    assert h.search(owner, "sofa", None).conversations.choices[0][1] == conversation  # message text is searched too
    assert h.search(owner, "giraffe", None).conversations.choices == []
    with pytest.raises(db.NotFoundError):
        h.delete(stranger, conversation)
    engine = h.services.model.engine()
    cached_before = len(engine.kv_cache)
    deleted = h.delete(owner, conversation)
    assert deleted.conversation_id is None and deleted.messages == [] and "deleted" in deleted.notice.text
    assert deleted.conversations.choices == [] and h.search(owner, "", None).conversations.choices == []
    assert len(engine.kv_cache) == cached_before - 1  # its KV cache is freed with it


def test_deleting_a_conversation_stops_its_reply(h, owner):
    sent = send(h, owner, "Tell me a long story", params=(0.0, 1.0, 64))
    job = h.replies.get((owner, sent.conversation_id))
    h.delete(owner, sent.conversation_id)
    assert job.cancel.is_set()
    wait_for(lambda: job.done, what="the reply's end")
    with h.storage.session() as s:
        assert db.list_conversations(s, owner_id=owner) == []


def test_generation_settings_are_remembered_per_conversation(h, owner):
    conversation, _ = ask(h, owner, "hi", params=(0.9, 0.8, 32))
    other, _ = ask(h, owner, "hello", params=(0.1, 1.0, 48))
    h.remember_settings(owner, conversation, 1.1, 0.7, 32)
    assert h.open(owner, conversation).params == GenerationParams(temperature=1.1, top_p=0.7, max_new_tokens=32)
    assert h.open(owner, other).params == GenerationParams(temperature=0.1, top_p=1.0, max_new_tokens=48)
    assert h.new_chat(owner).params == GenerationParams(max_new_tokens=64)  # the defaults, within --max-new-tokens


def test_unanswered_questions_fold_into_the_next_turn():
    def rec(position, role, text, image=None):
        return db.MessageRecord(id=position, conversation_id="c", position=position, role=role, text=text,
                                image_sha256=image, status=db.MessageStatus.COMPLETE, finish_reason=None,
                                prompt_tokens=None, completion_tokens=None, reused_tokens=None,
                                first_token_seconds=None, duration_seconds=None, created_at=None, updated_at=None)

    records = [rec(0, db.Role.USER, "old", "a" * 64), rec(1, db.Role.ASSISTANT, "ok"),
               rec(2, db.Role.USER, "new photo", "b" * 64), rec(3, db.Role.ASSISTANT, ""),
               rec(4, db.Role.USER, "again?")]
    messages = model_messages(records, photo=lambda sha: sha[0])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": "old"}]  # only the newest photo is sent
    assert messages[2]["content"] == [{"type": "image", "image": "b"}, {"type": "text", "text": "again?"}]


def test_a_reply_that_cannot_start_leaves_the_question_stored_once_and_the_page_idle(app_services, monkeypatch):
    """Another tab starts a reply between Send's check and its start (issue 14): the question is
    shown stored, the box is emptied so it cannot be sent twice, Send is usable, and a notice says why."""
    h = Handlers(app_services)
    owner = new_visitor(h)
    conversation, _ = ask(h, owner, "First question")
    gate = threading.Event()
    app_services.replies.start((owner, conversation), lambda job: gate.wait(10), notice_for=str)
    monkeypatch.setattr(app_services.replies, "running", lambda key: False)  # the race: the check saw none
    try:
        view = send(h, owner, "Second question", conversation=conversation)
    finally:
        gate.set()
    assert view.busy is False and view.composer == "clear"
    assert "Regenerate" in view.notice.text and "still being written" in view.notice.text
    questions = [r.text for r in stored(h, owner, conversation) if r.role is db.Role.USER]
    assert questions == ["First question", "Second question"]
