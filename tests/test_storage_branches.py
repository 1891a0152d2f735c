"""Conversation trees: edits and regenerated replies make branches; the active path is what is shown."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sqlalchemy import event, text

import storage as st
from tests.storage_helpers import Chat, Configure, make_user

pytest_plugins = ("tests.storage_fixtures",)  # the backend, data_dir, storage_config and storage fixtures


@pytest.fixture
def chat(storage: st.Storage) -> Chat:
    return Chat.start(storage, make_user(storage, "ana"))


def ids(messages: list[st.MessageRecord]) -> list[int]:
    return [message.id for message in messages]


def count_statements(storage: st.Storage, call: Callable[[], object]) -> int:
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_rest) -> None:
        statements.append(statement)

    event.listen(storage.engine, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(storage.engine, "before_cursor_execute", record)
    return len(statements)


def test_an_edited_question_is_a_sibling_and_both_branches_stay_reachable(chat: Chat) -> None:
    q1, r1 = chat.ask("What bird is this?"), chat.answer("A robin.")
    q2, r2 = chat.ask("Where does it live?"), chat.answer("In Europe.")
    q2b = chat.ask("Where does it sleep?", edit_of=q2.id)
    assert (q2b.parent_id, q2b.position, q2b.sibling_ids) == (r1.id, q2.position, (q2.id, q2b.id))
    assert chat.texts() == ["What bird is this?", "A robin.", "Where does it sleep?"]
    r2b = chat.answer("In hedges.")

    old = chat.switch(q2.id)
    assert ids(old) == [q1.id, r1.id, q2.id, r2.id] and chat.path() == old
    assert old[2].sibling_ids == (q2.id, q2b.id) and old[3].sibling_ids == (r2.id,)
    assert [m.parent_id for m in old] == [None, q1.id, r1.id, q2.id]

    new = chat.switch(q2b.id)
    assert ids(new) == [q1.id, r1.id, q2b.id, r2b.id]
    assert new[2].sibling_ids == (q2.id, q2b.id)


def test_editing_the_first_question_makes_a_second_root_and_keeps_the_title(chat: Chat) -> None:
    q1 = chat.ask("What bird is this?")
    chat.answer("A robin.")
    q1b = chat.ask("What tree is this?", edit_of=q1.id)
    assert (q1b.parent_id, q1b.position, q1b.sibling_ids) == (None, 0, (q1.id, q1b.id))
    assert chat.texts() == ["What tree is this?"]
    with chat.storage.session() as session:
        title = st.get_conversation(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id).title
    assert title == "What bird is this?"


def test_regenerating_keeps_the_old_reply_as_a_sibling(chat: Chat) -> None:
    question, old = chat.ask("What bird is this?"), chat.answer("A robin.")
    assert ids(chat.regenerate(question.id)) == [question.id]
    new = chat.answer("A European robin.")
    assert (new.parent_id, new.position, new.sibling_ids) == (question.id, old.position, (old.id, new.id))
    assert chat.texts() == ["What bird is this?", "A European robin."]
    assert chat.path()[-1].sibling_ids == (old.id, new.id)
    back = chat.switch(old.id)
    assert [m.text for m in back] == ["What bird is this?", "A robin."]


def test_list_messages_returns_only_the_active_path(chat: Chat) -> None:
    question = chat.ask("What bird is this?")
    chat.answer("A robin.")
    chat.ask("Is it rare?")
    chat.regenerate(question.id)
    chat.answer("A wren.")
    with chat.storage.engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT count(*) FROM messages").scalar()
    assert stored == 4
    assert chat.texts() == ["What bird is this?", "A wren."]


def test_switching_follows_the_newest_child_down(chat: Chat) -> None:
    question, first = chat.ask("What bird is this?"), chat.answer("A robin.")
    chat.regenerate(question.id)
    second = chat.answer("A wren.")
    chat.switch(first.id)
    follow_up = chat.ask("Is it rare?")
    assert ids(chat.path()) == [question.id, first.id, follow_up.id]
    assert ids(chat.switch(question.id)) == [question.id, second.id]  # the newest reply, not the newest message
    assert ids(chat.switch(first.id)) == [question.id, first.id, follow_up.id]


def test_a_question_left_without_a_reply_is_followed_by_the_next_one(chat: Chat) -> None:
    first = chat.ask("What bird is this?")
    second = chat.ask("Hello?")
    assert (second.parent_id, second.position) == (first.id, 1)
    assert chat.answer("A robin.").parent_id == second.id


def test_a_reply_needs_a_question_to_answer(chat: Chat) -> None:
    with pytest.raises(st.InvalidInputError, match="no question waiting"):
        chat.answer("Out of nowhere.")
    chat.ask("What bird is this?")
    chat.answer("A robin.")
    with pytest.raises(st.InvalidInputError, match="already ends with a reply"):
        chat.answer("Twice.")
    assert chat.texts() == ["What bird is this?", "A robin."]


def test_only_questions_can_be_edited_or_regenerated_from(chat: Chat) -> None:
    chat.ask("What bird is this?")
    reply = chat.answer("A robin.")
    with pytest.raises(st.InvalidInputError, match="only questions can be edited"):
        chat.ask("Edited reply", edit_of=reply.id)
    with pytest.raises(st.InvalidInputError, match="regenerate from the question"):
        chat.regenerate(reply.id)
    assert chat.texts() == ["What bird is this?", "A robin."]


OTHER_MESSAGE_CALLS = {
    "switch": lambda chat, message_id: chat.switch(message_id),
    "regenerate": lambda chat, message_id: chat.regenerate(message_id),
    "edit": lambda chat, message_id: chat.ask("mine now", edit_of=message_id),
}


@pytest.mark.parametrize("call", OTHER_MESSAGE_CALLS.values(), ids=OTHER_MESSAGE_CALLS.keys())
def test_someone_elses_messages_look_like_missing_ones(storage: st.Storage, chat: Chat, call) -> None:
    question = chat.ask("secret plans")
    chat.answer("noted")
    bob = make_user(storage, "bob")
    in_alices = Chat(storage, bob, chat.conversation)
    with pytest.raises(st.ConversationNotFoundError):
        call(in_alices, question.id)
    in_his_own = Chat.start(storage, bob)
    in_his_own.ask("hello")
    for message_id in (question.id, 10_000, True, str(question.id)):
        with pytest.raises(st.MessageNotFoundError):
            call(in_his_own, message_id)
    assert chat.texts() == ["secret plans", "noted"] and in_his_own.texts() == ["hello"]


def test_list_messages_reads_the_siblings_of_a_long_path_in_the_same_few_queries(chat: Chat) -> None:
    question = chat.ask("q0")
    chat.answer("a0")
    chat.regenerate(question.id)
    chat.answer("b0")

    def read() -> list[st.MessageRecord]:
        return chat.path()

    short = count_statements(chat.storage, read)
    for n in range(1, 8):
        chat.ask(f"q{n}", edit_of=chat.ask(f"x{n}").id)
        chat.answer(f"a{n}")
    assert [len(m.sibling_ids) for m in read()] == [1, 2] + [2, 1] * 7
    assert count_statements(chat.storage, read) == short


def test_deleting_from_a_depth_removes_only_that_branch(chat: Chat) -> None:
    question, first = chat.ask("What bird is this?"), chat.answer("A robin.")
    chat.regenerate(question.id)
    second = chat.answer("A wren.")
    chat.ask("Is it rare?")
    with chat.storage.session() as session:
        deleted = st.delete_messages_from(
            session, owner_id=chat.owner.id, conversation_id=chat.conversation.id, position=second.position
        )
    assert deleted == 2
    assert ids(chat.path()) == [question.id]
    assert ids(chat.switch(first.id)) == [question.id, first.id] and chat.path()[-1].sibling_ids == (first.id,)
    with chat.storage.session() as session, pytest.raises(st.InvalidInputError):
        st.delete_messages_from(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id, position=-1)


def test_the_message_limit_counts_every_branch(storage_config: Configure) -> None:
    opened = st.open_storage(
        storage_config(limits=st.StorageLimits(max_messages_per_conversation=3))
    )
    chat = Chat.start(opened, make_user(opened, "ana"))
    question = chat.ask("What bird is this?")
    chat.answer("A robin.")
    chat.regenerate(question.id)
    chat.answer("A wren.")
    with pytest.raises(st.LimitExceededError, match="reached 3 messages"):
        chat.ask("edited", edit_of=question.id)
    opened.close()


def test_export_writes_the_active_path_and_import_makes_it_one_branch(storage: st.Storage, chat: Chat) -> None:
    question = chat.ask("What bird is this?")
    chat.answer("A robin.")
    chat.ask("What tree is this?", edit_of=question.id)
    chat.answer("An oak.")
    with storage.session() as session:
        exported = st.export_json(
            session, storage=storage, owner_id=chat.owner.id, conversation_id=chat.conversation.id
        )
    assert [m["text"] for m in json.loads(exported)["messages"]] == ["What tree is this?", "An oak."]
    imported = Chat(storage, chat.owner, st.import_json(storage, owner_id=chat.owner.id, data=exported))
    path = imported.path()
    assert [m.text for m in path] == ["What tree is this?", "An oak."]
    assert [m.parent_id for m in path] == [None, path[0].id]
    with storage.engine.connect() as connection:
        leaf = connection.execute(
            text("SELECT active_leaf_id FROM conversations WHERE id = :id"), {"id": imported.conversation.id}
        ).scalar()
    assert leaf == path[-1].id
