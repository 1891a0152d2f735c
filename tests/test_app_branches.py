"""Edit and regenerate through the handlers: versions, switching between them, the cache, the meter."""

from __future__ import annotations

import json

import pytest

import storage as db
from app.events import Refused
from app.handlers import Handlers
from app.page_view import KEEP, Editing, PageView


@pytest.fixture
def h(app_handlers) -> Handlers:
    return app_handlers


@pytest.fixture
def owner(h: Handlers) -> int:
    return h.owner("browser-secret-of-alice-0123456789", username=None, oauth_username=None)


def ask(h: Handlers, owner: int, text: str, conversation: str | None = None,
        editing: Editing | None = None) -> PageView:
    """Send, then follow the reply to its end; the last view the page would show."""
    sent = h.send(owner, {"text": text, "files": []}, conversation, editing, 0.0, 1.0, 16)
    views = list(h.attach(owner, sent.conversation_id, new_reply=True))
    assert views and views[-1].busy is False
    return PageView(conversation_id=sent.conversation_id).merged(views[-1])


def stored(h: Handlers, owner: int, conversation: str) -> list[db.MessageRecord]:
    with h.storage.session() as s:
        return db.list_messages(s, owner_id=owner, conversation_id=conversation)


def test_an_edited_question_is_a_new_version_and_both_stay_reachable(h, owner):
    first = ask(h, owner, "What is in the photo?")
    conversation = first.conversation_id
    ask(h, owner, "And the colours?", conversation)
    follow_up = stored(h, owner, conversation)[2]
    editing = h.page_action(owner, conversation, json.dumps({"action": "edit", "message": follow_up.id})).editing
    assert editing == Editing(follow_up.id, editing.label)
    ask(h, owner, "And the shapes?", conversation, editing)

    messages = stored(h, owner, conversation)
    assert [m.text for m in messages[::2]] == ["What is in the photo?", "And the shapes?"]
    assert len(messages[2].sibling_ids) == 2 and messages[2].sibling_ids[0] == follow_up.id
    assert 'class="branch-switch"' in h.open(owner, conversation).messages[-2]["content"]

    switched = h.page_action(owner, conversation, json.dumps({"action": "switch", "message": follow_up.id}))
    assert "And the colours?" in switched.messages[-2]["content"]
    assert "16 kept for the reply" in switched.context  # the conversation's own reply length, not the default
    assert [m.text for m in stored(h, owner, conversation)[::2]] == ["What is in the photo?", "And the colours?"]


def test_the_new_version_reuses_the_cached_start_of_the_conversation(h, owner):
    conversation = ask(h, owner, "Describe the scene in detail, please.").conversation_id
    ask(h, owner, "What else?", conversation)
    follow_up = stored(h, owner, conversation)[2]
    ask(h, owner, "What more?", conversation, Editing(follow_up.id, ""))
    reply = stored(h, owner, conversation)[-1]
    assert reply.reused_tokens and reply.reused_tokens > 0  # the system prompt and the first turn


def test_a_finished_reply_is_followed_only_right_after_sending(h, owner):
    """After a load or a switch the page already shows what is stored: nothing to draw again."""
    conversation = ask(h, owner, "Hello").conversation_id
    assert list(h.attach(owner, conversation)) == []
    (final,) = h.attach(owner, conversation, new_reply=True)
    assert final.busy is False and final.conversation_id is KEEP  # never moves the page elsewhere


def test_regenerate_keeps_the_earlier_reply_as_a_version(h, owner):
    conversation = ask(h, owner, "Hello").conversation_id
    earlier = stored(h, owner, conversation)[-1]
    h.regenerate(owner, conversation, 1.0, 1.0, 16)
    list(h.attach(owner, conversation, new_reply=True))
    newer = stored(h, owner, conversation)[-1]
    assert newer.id != earlier.id and newer.sibling_ids == (earlier.id, newer.id)


def test_editing_a_question_of_another_conversation_is_refused_and_changes_nothing(h, owner):
    mine = ask(h, owner, "Mine").conversation_id
    other = ask(h, owner, "Other").conversation_id
    foreign = stored(h, owner, other)[0]
    with pytest.raises(Refused, match="no longer on this branch"):
        h.send(owner, {"text": "hijack", "files": []}, mine, Editing(foreign.id, ""), 0.0, 1.0, 16)
    assert stored(h, owner, other)[0].text == "Other"
    assert len(stored(h, owner, mine)) == 2


@pytest.mark.parametrize("payload", ["", "{", "[]", '{"action": "switch", "message": "1"}',
                                     '{"action": "switch", "message": 99999}', "x" * 5000])
def test_junk_page_actions_change_nothing(h, owner, payload):
    conversation = ask(h, owner, "Hello").conversation_id
    before = stored(h, owner, conversation)
    try:
        h.page_action(owner, conversation, payload)
    except db.NotFoundError:
        pass
    assert stored(h, owner, conversation) == before


def test_the_context_meter_shows_the_window_used(h, owner):
    view = ask(h, owner, "How much room is left?")
    assert "of 2,048 positions" in view.context and "<meter" in view.context
    assert h.new_chat(owner).context == ""


def test_turns_the_model_no_longer_sees_are_marked_and_counted(h, owner):
    long_text = "word " * 300  # about 600 tokens a turn: three turns and a reply overflow 2,048 positions
    with h.storage.session() as s:
        conversation = db.create_conversation(s, owner_id=owner).id
        for turn in range(3):
            db.add_user_message(s, owner_id=owner, conversation_id=conversation, text=f"Turn {turn}: {long_text}")
            reply = db.start_assistant_message(s, owner_id=owner, conversation_id=conversation)
            db.update_assistant_message(s, owner_id=owner, message_id=reply.id, text="ok",
                                        status=db.MessageStatus.COMPLETE)
    view = h.open(owner, conversation)
    questions = [m["content"] for m in view.messages if m["role"] == "user"]
    assert "no longer sees" in questions[0] and "no longer sees" not in questions[-1]
    assert "oldest turn" in view.context
