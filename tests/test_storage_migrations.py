"""Upgrading real databases made by older revisions, and downgrading back (both backends, from empty)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Connection, DateTime, Engine, bindparam, inspect, text

import storage as st
from storage.db import create_storage_engine
from storage.images import prepare_image
from storage.migrate import alembic_config, downgrade_to, upgrade_to
from storage.photo_store import write_image_file
from tests.storage_helpers import Chat, Configure, jpeg_bytes, make_user, sqlite_only

pytest_plugins = ("tests.storage_fixtures",)  # the backend, data_dir and storage fixtures


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """Every database here starts empty: the migrations build it."""
    return None if backend == "sqlite" else request.getfixturevalue("postgres_empty_database")

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


def engine_at(config: st.StorageConfig, revision: str) -> Engine:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_storage_engine(config)
    upgrade_to(engine, revision=revision)
    return engine


def insert(connection: Connection, sql: str, **values: object) -> None:
    """``sql`` with :named values; ``now`` is a timestamp of the dialect's kind."""
    statement = text(sql)
    if "now" in values:
        statement = statement.bindparams(bindparam("now", type_=DateTime(timezone=True)))
    connection.execute(statement, values)


def advance_sequences(connection: Connection) -> None:
    """Rows inserted with explicit ids leave PostgreSQL's sequences behind; SQLite needs nothing."""
    if connection.dialect.name == "postgresql":
        for table in ("users", "messages"):
            connection.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
            )


def fill_0002(engine: Engine) -> None:
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    with engine.begin() as connection:
        insert(connection, "INSERT INTO users (id, kind, identity, created_at) VALUES (1, 'oauth', 'ana', :now)",
               now=now)
        for conversation_id in CONVERSATIONS:
            insert(connection, "INSERT INTO conversations (id, owner_id, title, settings, created_at, updated_at) "
                   "VALUES (:id, 1, 'Old', '{}', :now, :now)", id=conversation_id, now=now)
        for message_id, conversation_id, position, role, message_text in MESSAGES_0002:
            insert(connection, "INSERT INTO messages (id, conversation_id, position, role, text, status, created_at, "
                   "updated_at) VALUES (:id, :conversation, :position, :role, :text, 'complete', :now, :now)",
                   id=message_id, conversation=conversation_id, position=position, role=role, text=message_text,
                   now=now)
        advance_sequences(connection)


def rows(engine: Engine, sql: str) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.exec_driver_sql(sql)]


def conversation_of(storage: st.Storage, owner: st.UserRecord, conversation_id: str) -> st.ConversationRecord:
    with storage.session() as session:
        return st.get_conversation(session, owner_id=owner.id, conversation_id=conversation_id)


def test_upgrading_a_0002_database_links_each_message_to_the_one_before(storage_config: Configure) -> None:
    old = engine_at(storage_config(), "0002")
    fill_0002(old)
    old.dispose()
    opened = st.open_storage(storage_config())

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


def test_downgrading_keeps_each_active_path_and_upgrading_again_restores_it(storage_config: Configure) -> None:
    opened = st.open_storage(storage_config())
    chat = Chat.start(opened, make_user(opened, "ana"))
    question = chat.ask("What bird is this?")
    chat.answer("A robin.")
    chat.ask("What tree is this?", edit_of=question.id)
    chat.answer("An oak.")
    with opened.session() as session:
        st.share_conversation(session, owner_id=chat.owner.id, conversation_id=chat.conversation.id)
    shown = chat.path()
    opened.close()

    engine = create_storage_engine(storage_config())
    downgrade_to(engine, revision="0002")
    tables = inspect(engine)
    assert "shares" not in tables.get_table_names()
    assert "parent_id" not in {c["name"] for c in tables.get_columns("messages")}
    assert rows(engine, "SELECT id, position FROM messages ORDER BY id") == [(m.id, m.position) for m in shown]
    assert rows(engine, "SELECT count(*) FROM conversations") == [(1,)]
    engine.dispose()

    reopened = st.open_storage(storage_config())
    path = Chat(reopened, chat.owner, chat.conversation).path()
    assert [(m.id, m.parent_id, m.text) for m in path] == [(m.id, m.parent_id, m.text) for m in shown]
    assert [m.sibling_ids for m in path] == [(m.id,) for m in shown]  # the other branch is gone
    reopened.close()


@sqlite_only
def test_revision_0003_refuses_to_copy_tables_with_sqlite_foreign_keys_on(storage_config: Configure) -> None:
    engine = engine_at(storage_config(), "0002")
    fill_0002(engine)
    config = alembic_config(engine)
    with engine.begin() as connection:  # foreign keys on, as every storage connection has them
        config.attributes["connection"] = connection
        with pytest.raises(RuntimeError, match="Run it through storage.migrate"):
            command.upgrade(config, "head")
    assert rows(engine, "SELECT version_num FROM alembic_version") == [("0002",)]
    assert rows(engine, "SELECT count(*) FROM messages") == [(len(MESSAGES_0002),)]
    engine.dispose()


PHOTO_QUESTION, HALF_REPLY = 20, 21


def fill_0003(engine: Engine, images_dir: Path) -> str:
    """What a 0003 server left: a photo question, a reply it was streaming when it stopped, the photo file."""
    photo = prepare_image(jpeg_bytes(color="green"), limits=st.StorageLimits())
    write_image_file(images_dir, photo)
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    with engine.begin() as connection:
        insert(connection, "INSERT INTO users (id, kind, identity, created_at) VALUES (1, 'oauth', 'ana', :now)",
               now=now)
        insert(connection, "INSERT INTO images (sha256, format, width, height, size_bytes, created_at) "
               "VALUES (:sha, 'JPEG', 64, 48, :size, :now)", sha=photo.sha256, size=len(photo.data), now=now)
        insert(connection, "INSERT INTO conversations (id, owner_id, title, settings, created_at, updated_at, "
               "active_leaf_id) VALUES (:id, 1, 'Old', '{}', :now, :now, :leaf)", id="d" * 32, now=now, leaf=HALF_REPLY)
        for message_id, parent, role, message_text, image, status in (
            (PHOTO_QUESTION, None, "user", "What colour?", photo.sha256, "complete"),
            (HALF_REPLY, PHOTO_QUESTION, "assistant", "Green, mo", None, "partial"),
        ):
            insert(connection, "INSERT INTO messages (id, conversation_id, parent_id, position, role, text, "
                   "image_sha256, status, created_at, updated_at) VALUES (:id, :c, :parent, :position, :role, "
                   ":text, :image, :status, :now, :now)", id=message_id, c="d" * 32, parent=parent,
                   position=0 if parent is None else 1, role=role, text=message_text, image=image, status=status,
                   now=now)
        advance_sequences(connection)
    return photo.sha256


def ana(storage: st.Storage) -> st.UserRecord:
    with storage.session() as session:
        return st.user_for_oauth(session, username="ana")


def test_upgrading_a_0003_database_interrupts_the_stopped_reply_and_keeps_the_photo(
    storage_config: Configure, tmp_path: Path
) -> None:
    config = storage_config()
    old = engine_at(config, "0003")
    sha256 = fill_0003(old, config.images_dir)
    old.dispose()

    opened = st.open_storage(config)
    path = Chat(opened, ana(opened), conversation_of(opened, ana(opened), "d" * 32)).path()
    assert [(m.id, m.status, m.text) for m in path] == [
        (PHOTO_QUESTION, st.MessageStatus.COMPLETE, "What colour?"),
        (HALF_REPLY, st.MessageStatus.INTERRUPTED, "Green, mo"),  # no replica streams it: its server stopped
    ]
    assert rows(opened.engine, "SELECT replica_id FROM messages ORDER BY id") == [(None,), (None,)]
    photo = st.image_path(opened, sha256).read_bytes()
    stored_bytes = rows(opened.engine, "SELECT count(*) FROM image_blobs")
    if config.is_shared:  # the photo of the one server before is now in the database, for every replica
        assert stored_bytes == [(1,)]
        other = st.open_storage(st.StorageConfig(data_dir=tmp_path / "other", database_url=config.database_url))
        assert st.image_path(other, sha256).read_bytes() == photo
        other.close()
    else:
        assert stored_bytes == [(0,)]  # SQLite: photos stay files
    opened.close()


def test_downgrading_0004_drops_replicas_and_photo_bytes_and_upgrading_again_restores_them(
    storage_config: Configure,
) -> None:
    opened = st.open_storage(storage_config())
    chat = Chat.start(opened, make_user(opened, "ana"))
    photo = st.save_image(opened, jpeg_bytes(color="green"))
    chat.ask("What colour?", image_sha256=photo.sha256)
    writer = st.ReplyWriter.start(opened, owner_id=chat.owner.id, conversation_id=chat.conversation.id)
    writer.append("Green")
    writer.flush()
    assert st.cache_all_photos(opened) == 1  # before leaving 0004: the photos as files in this data dir
    shown = [(m.id, m.text) for m in chat.path()]
    photo_bytes = st.image_path(opened, photo.sha256).read_bytes()
    opened.close()

    engine = create_storage_engine(storage_config())
    downgrade_to(engine, revision="0003")
    tables = inspect(engine)
    assert not {"replicas", "image_blobs"} & set(tables.get_table_names())
    assert "replica_id" not in {c["name"] for c in tables.get_columns("messages")}
    assert rows(engine, "SELECT id, text FROM messages ORDER BY id") == shown
    engine.dispose()

    reopened = st.open_storage(storage_config())
    again = Chat(reopened, chat.owner, chat.conversation)
    assert [(m.id, m.text) for m in again.path()] == shown
    assert again.path()[-1].status is st.MessageStatus.INTERRUPTED
    assert st.image_path(reopened, photo.sha256).read_bytes() == photo_bytes
    if reopened.config.is_shared:
        assert rows(reopened.engine, "SELECT count(*) FROM image_blobs") == [(1,)]  # adopted from the files again
    reopened.close()
