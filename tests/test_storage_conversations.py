"""Conversations and messages: ownership isolation, titles, search, limits."""

from __future__ import annotations

import pytest

import storage as st
from tests.storage_helpers import Configure, make_conversation, make_user

pytest_plugins = ("tests.storage_fixtures",)  # the backend, data_dir, storage_config and storage fixtures


@pytest.fixture
def two_users(storage: st.Storage) -> tuple[st.UserRecord, st.UserRecord, st.ConversationRecord]:
    alice, bob = make_user(storage, "alice"), make_user(storage, "bob")
    conversation = make_conversation(storage, alice)
    with storage.session() as session:
        st.add_user_message(session, owner_id=alice.id, conversation_id=conversation.id, text="secret plans")
        conversation = st.get_conversation(session, owner_id=alice.id, conversation_id=conversation.id)
    return alice, bob, conversation


OWNER_SCOPED_CALLS = {
    "get": lambda s, o, c: st.get_conversation(s, owner_id=o, conversation_id=c),
    "rename": lambda s, o, c: st.rename_conversation(s, owner_id=o, conversation_id=c, title="mine now"),
    "settings": lambda s, o, c: st.update_conversation_settings(s, owner_id=o, conversation_id=c, settings={}),
    "delete": lambda s, o, c: st.delete_conversation(s, owner_id=o, conversation_id=c),
    "list_messages": lambda s, o, c: st.list_messages(s, owner_id=o, conversation_id=c),
    "add_message": lambda s, o, c: st.add_user_message(s, owner_id=o, conversation_id=c, text="hi"),
    "start_reply": lambda s, o, c: st.start_assistant_message(s, owner_id=o, conversation_id=c),
    "delete_from": lambda s, o, c: st.delete_messages_from(s, owner_id=o, conversation_id=c, position=0),
}


@pytest.mark.parametrize("call", OWNER_SCOPED_CALLS.values(), ids=OWNER_SCOPED_CALLS.keys())
def test_someone_elses_conversation_looks_exactly_like_a_missing_one(storage, two_users, call) -> None:
    alice, bob, conversation = two_users
    missing_id = "0" * 32
    with storage.session() as session, pytest.raises(st.ConversationNotFoundError) as foreign:
        call(session, bob.id, conversation.id)
    with storage.session() as session, pytest.raises(st.ConversationNotFoundError) as missing:
        call(session, bob.id, missing_id)
    assert type(foreign.value) is type(missing.value)
    assert str(foreign.value).replace(conversation.id, "ID") == str(missing.value).replace(missing_id, "ID")
    with storage.session() as session:  # and nothing of alice's changed
        assert st.get_conversation(session, owner_id=alice.id, conversation_id=conversation.id) == conversation
        assert [m.text for m in st.list_messages(session, owner_id=alice.id, conversation_id=conversation.id)] == [
            "secret plans"
        ]


def test_lists_and_searches_never_show_other_users_conversations(storage, two_users) -> None:
    alice, bob, conversation = two_users
    with storage.session() as session:
        assert st.list_conversations(session, owner_id=bob.id) == []
        assert st.list_conversations(session, owner_id=bob.id, query="secret") == []
        assert [c.id for c in st.list_conversations(session, owner_id=alice.id, query="secret")] == [conversation.id]


def test_someone_elses_reply_cannot_be_updated(storage, two_users) -> None:
    alice, bob, conversation = two_users
    with storage.session() as session:
        reply = st.start_assistant_message(session, owner_id=alice.id, conversation_id=conversation.id)
    with storage.session() as session, pytest.raises(st.MessageNotFoundError):
        st.update_assistant_message(session, owner_id=bob.id, message_id=reply.id, text="pwned")
    with storage.session() as session, pytest.raises(st.MessageNotFoundError):
        st.update_assistant_message(session, owner_id=bob.id, message_id=10_000, text="pwned")


@pytest.mark.parametrize("bad_id", ["", "../../etc/passwd", "1", "0" * 31 + "'", 42])
def test_malformed_conversation_ids_are_not_found(storage, two_users, bad_id) -> None:
    alice, _, _ = two_users
    with storage.session() as session, pytest.raises(st.ConversationNotFoundError):
        st.get_conversation(session, owner_id=alice.id, conversation_id=bad_id)


def test_first_question_becomes_the_title_and_it_can_be_renamed(storage) -> None:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user)
    assert conversation.title == st.DEFAULT_TITLE
    question = "  What   kind of\n bird is   this, and where does it usually live in winter time?  " * 2
    with storage.session() as session:
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text=question)
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="second question")
        title = st.get_conversation(session, owner_id=user.id, conversation_id=conversation.id).title
    assert title.startswith("What kind of bird is this, and where") and title.endswith("…")
    assert len(title) <= st.StorageLimits().max_title_chars and "  " not in title
    with storage.session() as session:
        renamed = st.rename_conversation(session, owner_id=user.id, conversation_id=conversation.id, title=" Birds ")
        with pytest.raises(st.InvalidInputError):
            st.rename_conversation(session, owner_id=user.id, conversation_id=conversation.id, title="   ")
    assert renamed.title == "Birds"


def test_title_from_text() -> None:
    assert st.title_from_text("  a \n b\t c ", max_chars=80) == "a b c"
    assert st.title_from_text("x" * 100, max_chars=10) == "x" * 9 + "…"
    assert st.title_from_text("one two three four five", max_chars=12) == "one two…"


def test_explicit_titles_are_kept_when_the_first_question_arrives(storage) -> None:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user, title="Holiday photos")
    with storage.session() as session:
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="hello")
        assert st.get_conversation(session, owner_id=user.id, conversation_id=conversation.id).title == "Holiday photos"


def test_settings_and_model_id_are_stored_as_json(storage) -> None:
    user = make_user(storage, "ana")
    settings = {"temperature": 0.7, "max_new_tokens": 512, "stop": ["</s>"]}
    conversation = make_conversation(storage, user, model_id="zhumj34/Mipha-3B", settings=settings)
    with storage.session() as session:
        st.update_conversation_settings(
            session, owner_id=user.id, conversation_id=conversation.id, settings={"temperature": 0.2}
        )
        stored = st.get_conversation(session, owner_id=user.id, conversation_id=conversation.id)
    assert conversation.settings == settings
    assert stored.settings == {"temperature": 0.2} and stored.model_id == "zhumj34/Mipha-3B"
    with storage.session() as session, pytest.raises(st.InvalidInputError):
        st.update_conversation_settings(
            session, owner_id=user.id, conversation_id=conversation.id, settings={"x": object()}
        )
    with storage.session() as session, pytest.raises(st.LimitExceededError):
        st.update_conversation_settings(
            session, owner_id=user.id, conversation_id=conversation.id, settings={"x": "y" * 10_000}
        )


def test_search_matches_all_words_in_titles_or_messages(storage) -> None:
    user = make_user(storage, "ana")
    ids = {}
    for title, text in [("Cats", "a ginger cat on a sofa"), ("Dogs", "100% good_boy"), ("Trip", "Kyoto temple")]:
        conversation = make_conversation(storage, user, title=title)
        ids[title] = conversation.id
        with storage.session() as session:
            st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text=text)

    def search(query: str) -> set[str]:
        with storage.session() as session:
            return {c.title for c in st.list_conversations(session, owner_id=user.id, query=query)}

    assert search("GINGER sofa") == {"Cats"}
    assert search("cats") == {"Cats"}
    assert search("kyoto dogs") == set()
    assert search("100%") == {"Dogs"}
    assert search("%") == {"Dogs"}  # the percent sign is a character, not a wildcard
    assert search("_") == {"Dogs"}
    assert search("") == {"Cats", "Dogs", "Trip"}


def test_conversations_are_listed_most_recent_first(storage) -> None:
    user = make_user(storage, "ana")
    first, second = make_conversation(storage, user), make_conversation(storage, user)
    with storage.session() as session:
        st.add_user_message(session, owner_id=user.id, conversation_id=first.id, text="bump")
        assert [c.id for c in st.list_conversations(session, owner_id=user.id)] == [first.id, second.id]


def test_regenerate_deletes_the_last_reply(storage) -> None:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user)
    with storage.session() as session:
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="q")
        reply = st.start_assistant_message(session, owner_id=user.id, conversation_id=conversation.id)
        assert st.delete_messages_from(
            session, owner_id=user.id, conversation_id=conversation.id, position=reply.position
        ) == 1
        again = st.start_assistant_message(session, owner_id=user.id, conversation_id=conversation.id)
        positions = [m.position for m in st.list_messages(session, owner_id=user.id, conversation_id=conversation.id)]
    assert again.position == reply.position and positions == [0, 1]


def test_conversation_count_limit(storage_config: Configure) -> None:
    opened = st.open_storage(storage_config(limits=st.StorageLimits(max_conversations_per_user=2)))
    user, other = make_user(opened, "ana"), make_user(opened, "bob")
    make_conversation(opened, user), make_conversation(opened, user)
    with pytest.raises(st.LimitExceededError, match="Delete some old ones") as error:
        make_conversation(opened, user)
    assert error.value.limit_name == "max_conversations_per_user"
    make_conversation(opened, other)  # a per-user limit
    opened.close()


def test_message_length_and_count_limits(storage_config: Configure) -> None:
    limits = st.StorageLimits(max_message_chars=100, max_messages_per_conversation=3)
    opened = st.open_storage(storage_config(limits=limits))
    user = make_user(opened, "ana")
    conversation = make_conversation(opened, user)
    with opened.session() as session, pytest.raises(st.LimitExceededError, match="limit is 100"):
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="x" * 101)
    with opened.session() as session:
        for _ in range(3):
            st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="x" * 100)
    with opened.session() as session, pytest.raises(st.LimitExceededError, match="new conversation"):
        st.start_assistant_message(session, owner_id=user.id, conversation_id=conversation.id)
    opened.close()


def test_a_message_needs_text_or_a_photo(storage) -> None:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user)
    with storage.session() as session, pytest.raises(st.InvalidInputError):
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="  ")
    with storage.session() as session, pytest.raises(st.ImageNotFoundError):
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="", image_sha256="a" * 64)



def test_a_conversation_started_with_a_photo_alone_is_named_by_its_first_reply(storage):
    user = make_user(storage, "alice")
    sha256 = _photo(storage)
    with storage.session() as s:
        photo = st.create_conversation(s, owner_id=user.id)
        st.add_user_message(s, owner_id=user.id, conversation_id=photo.id, text="", image_sha256=sha256)
        named = st.create_conversation(s, owner_id=user.id)
        st.add_user_message(s, owner_id=user.id, conversation_id=named.id, text="Which bird?")
    with storage.session() as s:
        assert st.get_conversation(s, owner_id=user.id, conversation_id=photo.id).title == "Photo"
        assert st.title_photo_conversation(s, owner_id=user.id, conversation_id=photo.id,
                                           reply_text="A cat sleeps on a sofa. It looks calm.")
        assert not st.title_photo_conversation(s, owner_id=user.id, conversation_id=named.id, reply_text="A robin.")
        assert st.get_conversation(s, owner_id=user.id, conversation_id=photo.id).title == "A cat sleeps on a sofa"
        assert st.get_conversation(s, owner_id=user.id, conversation_id=named.id).title == "Which bird?"


def _photo(storage: st.Storage) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return st.save_image(storage, buffer.getvalue()).sha256
