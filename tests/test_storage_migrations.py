"""Upgrading real databases made by older revisions, and downgrading back."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, inspect

import storage as st
from storage.db import create_storage_engine
from storage.migrate import alembic_config, downgrade_to, upgrade_to
from tests.storage_helpers import Chat, make_user

pytest_plugins = ("tests.storage_fixtures",)  # the data_dir and storage fixtures

# Two conversations as revision 0002 stored them (one empty), with ids out of
# position order, as concurrent writers could leave them.
CONVERSATIONS = ("a" * 32, "b" * 32, "c" * 32)
MESSAGES_0002 = [  # id, conversation, position, role, text
    (10, "a" * 32, 0, "user", "What bird is this?"),
    (12, "a" * 32, 1, "assistant", "A robin."),
    (11, "b" * 32, 0, "user", "Hello?"),
    (13, "a" * 32, 2, "user", "Where does it live?"),
    (15, "a" * 32, 3, "assistant", "In Europe."),
]


def engine_at(data_dir: Path, revision: str) -> Engine:
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_storage_engine(st.StorageConfig(data_dir=data_dir))
    upgrade_to(engine, revision=revision)
    return engine


def fill_0002(engine: Engine) -> None:
    now = "2024-05-01 12:00:00.000000"
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO users (id, kind, identity, created_at) VALUES (1, 'oauth', 'ana', ?)", (now,)
        )
        for conversation_id in CONVERSATIONS:
            connection.exec_driver_sql(
                "INSERT INTO conversations (id, owner_id, title, settings, created_at, updated_at) "
                "VALUES (?, 1, 'Old', '{}', ?, ?)",
                (conversation_id, now, now),
            )
        for message_id, conversation_id, position, role, text in MESSAGES_0002:
            connection.exec_driver_sql(
                "INSERT INTO messages (id, conversation_id, position, role, text, status, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, 'complete', ?, ?)",
                (message_id, conversation_id, position, role, text, now, now),
            )


def rows(engine: Engine, sql: str) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.exec_driver_sql(sql)]


def conversation_of(storage: st.Storage, owner: st.UserRecord, conversation_id: str) -> st.ConversationRecord:
    with storage.session() as session:
        return st.get_conversation(session, owner_id=owner.id, conversation_id=conversation_id)


def test_upgrading_a_0002_database_links_each_message_to_the_one_before(data_dir: Path) -> None:
    old = engine_at(data_dir, "0002")
    fill_0002(old)
    old.dispose()
    opened = st.open_storage(st.StorageConfig(data_dir=data_dir))

    assert rows(opened.engine, "SELECT id, parent_id FROM messages ORDER BY id") == [
        (10, None), (11, None), (12, 10), (13, 12), (15, 13)
    ]
    assert rows(opened.engine, "SELECT id, active_leaf_id FROM conversations ORDER BY id") == [
        ("a" * 32, 15), ("b" * 32, 11), ("c" * 32, None)
    ]
    with opened.session() as session:
        ana = st.user_for_oauth(session, username="ana")
    chat = Chat(opened, ana, conversation_of(opened, ana, "a" * 32))
    assert chat.texts() == ["What bird is this?", "A robin.", "Where does it live?", "In Europe."]
    assert all(m.sibling_ids == (m.id,) for m in chat.path())
    chat.regenerate(13)
    assert chat.answer("In gardens.").sibling_ids == (15, 16)  # siblings share a position now
    opened.close()


def test_downgrading_keeps_each_active_path_and_upgrading_again_restores_it(data_dir: Path) -> None:
    opened = st.open_storage(st.StorageConfig(data_dir=data_dir))
    chat = Chat.start(opened, make_user(opened, "ana"))
    question = chat.ask("What bird is this?")
    chat.answer("A robin.")
    chat.ask("What tree is this?", edit_of=question.id)
    chat.answer("An oak.")
    with opened.session() as session:
        st.share_conversation(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id)
    shown = chat.path()
    opened.close()

    engine = create_storage_engine(st.StorageConfig(data_dir=data_dir))
    downgrade_to(engine, revision="0002")
    tables = inspect(engine)
    assert "shares" not in tables.get_table_names()
    assert "parent_id" not in {c["name"] for c in tables.get_columns("messages")}
    assert rows(engine, "SELECT id, position FROM messages ORDER BY id") == [(m.id, m.position) for m in shown]
    assert rows(engine, "SELECT count(*) FROM conversations") == [(1,)]
    engine.dispose()

    reopened = st.open_storage(st.StorageConfig(data_dir=data_dir))
    path = Chat(reopened, chat.owner, chat.conversation).path()
    assert [(m.id, m.parent_id, m.text) for m in path] == [(m.id, m.parent_id, m.text) for m in shown]
    assert [m.sibling_ids for m in path] == [(m.id,) for m in shown]  # the other branch is gone
    reopened.close()


def test_revision_0003_refuses_to_copy_tables_with_sqlite_foreign_keys_on(data_dir: Path) -> None:
    engine = engine_at(data_dir, "0002")
    fill_0002(engine)
    config = alembic_config(engine)
    with engine.begin() as connection:  # foreign keys on, as every storage connection has them
        config.attributes["connection"] = connection
        with pytest.raises(RuntimeError, match="Run it through storage.migrate"):
            command.upgrade(config, "head")
    assert rows(engine, "SELECT version_num FROM alembic_version") == [("0002",)]
    assert rows(engine, "SELECT count(*) FROM messages") == [(len(MESSAGES_0002),)]
    engine.dispose()
