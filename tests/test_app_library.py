"""Share links, export and import through the sidebar's handlers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import storage as db
from app.events import Refused
from app.handlers import Handlers
from app.library import Library


@pytest.fixture
def h(app_handlers) -> Handlers:
    return app_handlers


@pytest.fixture
def library(app_services, h) -> Library:
    return Library(app_services, open=h.open)


def owner_of(h: Handlers, name: str) -> int:
    return h.owner(f"browser-secret-of-{name}-0123456789", username=None, oauth_username=None)


def conversation_of(h: Handlers, owner: int, text: str) -> str:
    sent = h.send(owner, {"text": text, "files": []}, None, None, 0.0, 1.0, 8)
    list(h.attach(owner, sent.conversation_id, new_reply=True))
    return sent.conversation_id


def test_a_link_is_made_once_shown_on_reopening_and_turned_off(h, library):
    alice = owner_of(h, "alice")
    conversation = conversation_of(h, alice, "Share me")
    path = library.share(alice, conversation).share.path
    assert path.startswith("/share/") and library.share(alice, conversation).share.path == path
    assert h.open(alice, conversation).share.path == path
    assert library.unshare(alice, conversation).share.path is None
    with h.storage.session() as s, pytest.raises(db.ShareRevokedError):
        db.shared_conversation(s, token=path.removeprefix("/share/"))
    assert library.share(alice, conversation).share.path != path  # a new link, never the old one again


def test_nobody_shares_or_turns_off_another_persons_conversation(h, library):
    conversation = conversation_of(h, owner_of(h, "alice"), "Mine")
    bob = owner_of(h, "bob")
    with pytest.raises(db.NotFoundError):
        library.share(bob, conversation)
    with pytest.raises(db.NotFoundError):
        library.unshare(bob, conversation)
    with pytest.raises(Refused, match="Open a conversation first"):
        library.share(bob, None)


def test_an_export_imports_for_someone_else_and_opens(h, library):
    alice, bob = owner_of(h, "alice"), owner_of(h, "bob")
    exported = Path(library.export(alice, conversation_of(h, alice, "Travel with me"), "json").download)
    assert json.loads(exported.read_text())["conversation"]["title"] == "Travel with me"
    view = library.import_(bob, [str(exported)])
    assert view.title == "Travel with me" and view.notice.text == "Imported 1 conversation."
    assert [label for label, _ in view.conversations.choices][0].startswith("Travel with me")


def test_an_import_of_nothing_usable_is_a_notice_and_stores_nothing(h, library, tmp_path):
    junk = tmp_path / "photo.json"
    junk.write_text('{"format": "something else"}')
    bob = owner_of(h, "bob")
    with pytest.raises(Refused, match="photo.json"):
        library.import_(bob, [str(junk)])
    with pytest.raises(Refused, match="nothing to export"):
        library.export_everything(bob)
