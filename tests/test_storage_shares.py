"""Read-only share links: what a link shows, turning it off, and refusing everything else."""

from __future__ import annotations

import re
import secrets

import pytest

import storage as st
from tests.storage_helpers import Chat, jpeg_bytes, make_user, png_bytes

pytest_plugins = ("tests.storage_fixtures",)  # the backend, data_dir, storage_config and storage fixtures

NOT_FOUND = "This shared link does not exist. Check the address, or ask the person who shared it for a new link."
TURNED_OFF = "The owner turned this shared link off. Ask them for a new link if you should still see it."


@pytest.fixture
def chat(storage: st.Storage) -> Chat:
    chat = Chat.start(storage, make_user(storage, "ana"))
    chat.ask("What bird is this?")
    chat.answer("A robin.")
    return chat


def share(chat: Chat) -> st.ShareRecord:
    with chat.storage.session() as session:
        return st.share_conversation(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id)


def revoke(chat: Chat) -> bool:
    with chat.storage.session() as session:
        return st.revoke_share(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id)


def share_state(chat: Chat) -> st.ShareRecord | None:
    with chat.storage.session() as session:
        return st.share_of(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id)


def view(storage: st.Storage, token: object) -> st.SharedConversation:
    with storage.session() as session:
        return st.shared_conversation(session, token=token)


def photo_path(storage: st.Storage, token: str, sha256: object):
    with storage.session() as session:
        return st.shared_image_path(session, storage=storage, token=token, sha256=sha256)


def test_a_link_shows_the_conversation_and_its_active_path(storage: st.Storage, chat: Chat) -> None:
    link = share(chat)
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", link.token) and link.active and link.revoked_at is None
    assert share(chat) == link == share_state(chat)  # sharing again keeps the same link
    shown = view(storage, link.token)
    with storage.session() as session:
        conversation = st.get_conversation(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id)
    assert (shown.conversation, shown.share) == (conversation, link)
    assert shown.messages == chat.path() and [m.text for m in shown.messages] == ["What bird is this?", "A robin."]


def test_a_link_shows_the_branch_on_screen_when_it_is_viewed(storage: st.Storage, chat: Chat) -> None:
    link = share(chat)
    question = chat.path()[0]
    chat.regenerate(question.id)
    chat.answer("A wren.")
    assert [m.text for m in view(storage, link.token).messages] == ["What bird is this?", "A wren."]


def test_a_revoked_link_says_it_was_turned_off_and_never_comes_back(storage: st.Storage, chat: Chat) -> None:
    old = share(chat)
    assert revoke(chat) is True and share_state(chat) is None
    with pytest.raises(st.ShareRevokedError) as turned_off:
        view(storage, old.token)
    assert str(turned_off.value) == TURNED_OFF and isinstance(turned_off.value, st.NotFoundError)
    assert revoke(chat) is False  # nothing was on
    new = share(chat)
    assert new.token != old.token and new.active and share_state(chat) == new
    with pytest.raises(st.ShareRevokedError):
        view(storage, old.token)
    assert view(storage, new.token).share == new


def test_a_conversation_never_shared_has_no_link(chat: Chat) -> None:
    assert share_state(chat) is None and revoke(chat) is False


@pytest.mark.parametrize(
    "token",
    ["", "%", "_", "%%%%", "A" * 65, "../mipha.sqlite3", "a b", "a'--", "ä" * 10, "tok\x00en", None, 42],
)
def test_garbage_tokens_are_not_found(storage: st.Storage, chat: Chat, token: object) -> None:
    share(chat)
    with pytest.raises(st.ShareNotFoundError) as missing:
        view(storage, token)
    assert str(missing.value) == NOT_FOUND and isinstance(missing.value, st.NotFoundError)


def test_only_the_exact_token_opens_a_link(storage: st.Storage, chat: Chat) -> None:
    token = share(chat).token
    for near in (secrets.token_urlsafe(24), token[:-1], token[:-1] + "%", token[:8] + "%", token.swapcase(),
                 token + "x", token + "A" * 40, token[:-1] + "_"):
        if near == token:
            continue  # swapcase of a token without letters, or a last character that was "_"
        with pytest.raises(st.ShareNotFoundError):
            view(storage, near)
    assert view(storage, token).conversation.id == chat.conversation.id


OWNER_CALLS = {
    "share": st.share_conversation,
    "revoke": st.revoke_share,
    "share_of": st.share_of,
}


@pytest.mark.parametrize("call", OWNER_CALLS.values(), ids=OWNER_CALLS.keys())
def test_someone_else_cannot_share_revoke_or_see_the_link(storage: st.Storage, chat: Chat, call) -> None:
    link = share(chat)
    bob = make_user(storage, "bob")
    with storage.session() as session, pytest.raises(st.NotFoundError):
        call(session, owner_id=bob.id, conversation_id=chat.conversation.id)
    assert share_state(chat) == link and view(storage, link.token).share.active


def test_a_shared_photo_is_served_only_through_its_own_link(storage: st.Storage, chat: Chat) -> None:
    shown, elsewhere, off_path = (st.save_image(storage, data).sha256
                                  for data in (jpeg_bytes(color="green"), png_bytes(), jpeg_bytes(color="navy")))
    question = chat.ask("And this one?", image_sha256=shown)
    chat.answer("A wren.")
    edited = chat.ask("And this one, then?", image_sha256=off_path, edit_of=question.id)
    chat.switch(question.id)
    other = Chat.start(storage, chat.owner)
    other.ask("Elsewhere", image_sha256=elsewhere)
    link, other_link = share(chat), share(other)

    assert photo_path(storage, link.token, shown) == st.image_path(storage, shown)
    assert photo_path(storage, other_link.token, elsewhere) == st.image_path(storage, elsewhere)
    for token, sha256 in [(link.token, elsewhere), (link.token, off_path), (other_link.token, shown),
                          (link.token, "0" * 64), (link.token, "../" + shown), (link.token, None),
                          ("nope", shown), (secrets.token_urlsafe(24), shown)]:
        with pytest.raises(st.ImageNotFoundError):
            photo_path(storage, token, sha256)
    assert edited.image_sha256 == off_path  # stored, just not on the shared path
    revoke(chat)
    with pytest.raises(st.ImageNotFoundError):
        photo_path(storage, link.token, shown)


def test_deleting_a_conversation_deletes_its_links(storage: st.Storage, chat: Chat) -> None:
    old = share(chat)
    revoke(chat)
    link = share(chat)
    with storage.session() as session:
        st.delete_conversation(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id)
    for token in (link.token, old.token):
        with pytest.raises(st.ShareNotFoundError):
            view(storage, token)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM shares").scalar() == 0
