"""Several servers (replicas) on one PostgreSQL database, each with its own data directory.

Real processes where it matters: replicas migrating an empty database at the same moment,
two replicas writing into one conversation at once, a replica killed mid-reply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

import storage as st
from storage.advisory import MIGRATIONS
from storage.migrate import upgrade_to_head
from tests.storage_helpers import (
    Chat,
    jpeg_bytes,
    make_conversation,
    make_user,
    reply_child,
    run_replica_children,
)
from tests.storage_reply_child import PARTIAL_TEXT

Replica = Callable[..., st.Storage]


@pytest.fixture
def replica(tmp_path: Path, postgres_database: str) -> Iterator[Replica]:
    """``replica(name, **options)``: open a Storage on the shared database with the data dir ``name``."""
    opened: list[st.Storage] = []

    def open_replica(name: str, **options: object) -> st.Storage:
        config = st.StorageConfig(data_dir=tmp_path / name, database_url=postgres_database, **options)
        opened.append(st.open_storage(config))
        return opened[-1]

    yield open_replica
    for storage in opened:
        storage.close()


def sql(storage: st.Storage, statement: str, **values: object) -> list[tuple]:
    with storage.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(statement), values)]


def reply_of(storage: st.Storage, owner_id: int, conversation_id: str, message_id: int) -> st.MessageRecord:
    with storage.session() as session:
        messages = st.list_messages(session, owner_id=owner_id, conversation_id=conversation_id)
    return next(m for m in messages if m.id == message_id)


def streaming_reply(storage: st.Storage, chat: Chat, text_so_far: str) -> st.ReplyWriter:
    chat.ask("What bird is this?")
    writer = st.ReplyWriter.start(storage, owner_id=chat.owner.id, conversation_id=chat.conversation.id)
    writer.append(text_so_far)
    writer.flush()
    return writer


# --- migrations: any number of replicas may start together on an empty database ---------------


@pytest.mark.timeout(180)
def test_replicas_starting_together_on_an_empty_database_all_come_up(
    tmp_path: Path, postgres_empty_database: str
) -> None:
    results = run_replica_children(
        [["open", str(tmp_path / f"replica{n}"), postgres_empty_database] for n in range(5)]
    )
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert {result.result["revision"] for result in results} == {"0004"}
    opened = st.open_storage(st.StorageConfig(data_dir=tmp_path / "check", database_url=postgres_empty_database))
    assert sql(opened, "SELECT version_num FROM alembic_version") == [("0004",)]
    assert sql(opened, "SELECT count(*) FROM replicas") == [(1,)]  # the children left; only this one is here
    opened.close()


def test_the_migration_lock_is_held_until_the_schema_is_at_head(tmp_path: Path, postgres_empty_database: str) -> None:
    """A replica arriving while another migrates waits for it (past lock_timeout), then finds nothing to do."""
    holder = psycopg.connect(postgres_empty_database.replace("postgresql+psycopg", "postgresql"), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATIONS,))  # as a migrating replica holds it
    opened: list[st.Storage] = []
    config = st.StorageConfig(data_dir=tmp_path / "waiting", database_url=postgres_empty_database, busy_timeout_ms=100)
    starting = threading.Thread(target=lambda: opened.append(st.open_storage(config)))
    starting.start()
    try:
        time.sleep(0.5)
        assert starting.is_alive() and not opened
    finally:
        holder.close()  # the lock goes with the session
        starting.join(timeout=30)
    assert opened and sql(opened[0], "SELECT version_num FROM alembic_version") == [("0004",)]
    upgrade_to_head(opened[0].engine)  # at head: nothing to do, no error
    opened[0].close()


# --- writing: two replicas in one conversation at once -----------------------------------------


@pytest.mark.timeout(180)
def test_two_replicas_writing_one_conversation_at_once_keep_one_chain_of_positions(
    tmp_path: Path, replica: Replica, postgres_database: str
) -> None:
    owner_storage = replica("owner")
    chat = Chat.start(owner_storage, make_user(owner_storage, "ana"))
    rounds = 40
    results = run_replica_children([
        ["answer", str(tmp_path / tag), postgres_database, str(chat.owner.id), chat.conversation.id, tag, str(rounds)]
        for tag in ("left", "right")
    ])
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    questions = sum(r.result["questions"] for r in results)
    replies = sum(r.result["replies"] for r in results)
    assert questions == 2 * rounds and replies + sum(r.result["no_question_waiting"] for r in results) == questions

    path = chat.path()
    assert len(path) == questions + replies  # every message is on the one branch: nobody forked it
    assert [m.position for m in path] == list(range(len(path)))
    assert all(m.sibling_ids == (m.id,) for m in path)
    assert all(m.parent_id == (path[i - 1].id if i else None) for i, m in enumerate(path))
    replies_on_path = [m for m in path if m.role is st.Role.ASSISTANT]
    assert all(m.status is st.MessageStatus.COMPLETE and m.parent_id for m in replies_on_path)
    assert sql(owner_storage, "SELECT count(*) FROM messages WHERE conversation_id = :c", c=chat.conversation.id) == [
        (len(path),)
    ]


# --- the crash sweep: per replica --------------------------------------------------------------


def test_a_replica_starting_leaves_another_replicas_live_reply_alone(replica: Replica) -> None:
    first = replica("first")
    chat = Chat.start(first, make_user(first, "ana"))
    writer = streaming_reply(first, chat, "The bird is a ")

    replica("second")  # its start-up sweep runs now

    assert reply_of(first, chat.owner.id, chat.conversation.id, writer.message.id).status is st.MessageStatus.PARTIAL
    writer.append("robin.")
    finished = writer.finish(finish_reason="stop")
    assert (finished.status, finished.text) == (st.MessageStatus.COMPLETE, "The bird is a robin.")


@pytest.mark.timeout(60)
def test_a_crashed_replicas_reply_is_interrupted_once_its_heartbeat_stops(
    tmp_path: Path, replica: Replica, postgres_database: str
) -> None:
    # Beats all along; its own sweeps wait long, so what follows is the start-up sweep's doing.
    live = replica("live", heartbeat_interval_s=0.2, replica_timeout_s=60)
    chat = Chat.start(live, make_user(live, "ana"))
    live_writer = streaming_reply(live, chat, "Still writing")
    with reply_child(tmp_path / "crashing", database_url=postgres_database) as child:
        child.kill()
    crashed = reply_of(live, child.owner_id, child.conversation_id, child.message_id)
    assert crashed.status is st.MessageStatus.PARTIAL  # its heartbeat is still recent

    time.sleep(1.6)  # the crashed replica's heartbeat is now older than the timeout
    replica("starting", heartbeat_interval_s=0.5, replica_timeout_s=1.5)

    crashed = reply_of(live, child.owner_id, child.conversation_id, child.message_id)
    assert (crashed.status, crashed.text) == (st.MessageStatus.INTERRUPTED, PARTIAL_TEXT)
    still_live = reply_of(live, chat.owner.id, chat.conversation.id, live_writer.message.id)
    assert still_live.status is st.MessageStatus.PARTIAL
    assert live_writer.finish().status is st.MessageStatus.COMPLETE


@pytest.mark.timeout(60)
def test_a_running_replica_sweeps_up_after_a_crashed_one_without_a_restart(
    tmp_path: Path, replica: Replica, postgres_database: str
) -> None:
    live = replica("live", heartbeat_interval_s=0.2, replica_timeout_s=1.0)
    with reply_child(tmp_path / "crashing", database_url=postgres_database) as child:
        child.kill()
    deadline = time.monotonic() + 20
    while reply_of(live, child.owner_id, child.conversation_id, child.message_id).status is st.MessageStatus.PARTIAL:
        assert time.monotonic() < deadline, "the live replica's heartbeat never swept the crashed reply"
        time.sleep(0.2)
    assert reply_of(live, child.owner_id, child.conversation_id, child.message_id).status is (
        st.MessageStatus.INTERRUPTED
    )
    assert sql(live, "SELECT id FROM replicas") == [(live.replica_id,)]  # the gone replica is forgotten


def test_a_replica_taken_for_gone_registers_again_and_close_leaves(replica: Replica) -> None:
    first = replica("first", heartbeat_interval_s=0.2, replica_timeout_s=1.0)
    second = replica("second")
    with first.engine.begin() as connection:  # as a replica that took it for gone would
        connection.execute(text("DELETE FROM replicas WHERE id = :id"), {"id": first.replica_id})
    deadline = time.monotonic() + 10
    while (first.replica_id,) not in sql(second, "SELECT id FROM replicas"):
        assert time.monotonic() < deadline, "the replica did not register again"
        time.sleep(0.1)
    first.close()
    assert sql(second, "SELECT id FROM replicas") == [(second.replica_id,)]


# --- photos: every replica serves every photo; a deleted one is served by none -----------------


def test_a_photo_stored_by_one_replica_is_readable_from_another(replica: Replica) -> None:
    first, second = replica("first"), replica("second")
    photo = st.save_image(first, jpeg_bytes(color="green"))
    user = make_user(first, "ana")
    chat = Chat.start(first, user)
    chat.ask("What colour?", image_sha256=photo.sha256)

    cached = st.image_path(second, photo.sha256)
    assert cached.is_relative_to(second.images_dir)
    assert cached.read_bytes() == st.image_path(first, photo.sha256).read_bytes()
    assert sql(second, "SELECT length(data) FROM image_blobs") == [(photo.size_bytes,)]
    with second.session() as session:
        exported = st.export_json(session, storage=second, owner_id=user.id, conversation_id=chat.conversation.id)
    assert "data:image/jpeg;base64," in exported


def test_a_photo_deleted_on_one_replica_is_not_served_from_anothers_cache(replica: Replica) -> None:
    first, second = replica("first"), replica("second")
    user = make_user(first, "ana")
    photo = st.save_image(first, jpeg_bytes(color="green"))
    conversation = make_conversation(first, user)
    Chat(first, user, conversation).ask("", image_sha256=photo.sha256)
    cached = st.image_path(second, photo.sha256)  # second has it in its cache now

    with first.session() as session:
        st.delete_conversation(session, owner_id=user.id, conversation_id=conversation.id)

    with pytest.raises(st.ImageNotFoundError):
        st.image_path(second, photo.sha256)  # what the page's file guard asks before serving a copy
    assert not cached.exists()  # and the stale copy is gone
    assert sql(first, "SELECT count(*) FROM image_blobs") == [(0,)]


def test_a_replica_starting_drops_cached_photos_deleted_while_it_was_down(
    tmp_path: Path, replica: Replica, postgres_database: str
) -> None:
    first = replica("first")
    user = make_user(first, "ana")
    photo = st.save_image(first, jpeg_bytes(color="green"))
    conversation = make_conversation(first, user)
    Chat(first, user, conversation).ask("", image_sha256=photo.sha256)
    config = st.StorageConfig(data_dir=tmp_path / "second", database_url=postgres_database)
    with st.open_storage(config) as second:
        cached = st.image_path(second, photo.sha256)
    with first.session() as session:
        st.delete_conversation(session, owner_id=user.id, conversation_id=conversation.id)

    with st.open_storage(config):
        assert not cached.exists()


def test_a_replica_starting_keeps_a_fresh_upload_another_replica_is_about_to_send(replica: Replica) -> None:
    first = replica("first")
    photo = st.save_image(first, jpeg_bytes(color="green"))  # uploaded, the question not stored yet

    second = replica("second")  # start-up sweep: unattached photos only go after the grace period

    chat = Chat.start(first, make_user(first, "ana"))
    chat.ask("And this?", image_sha256=photo.sha256)
    assert st.image_path(second, photo.sha256).is_file()


def test_an_unattached_photo_older_than_the_grace_period_is_removed(replica: Replica) -> None:
    first = replica("first")
    photo = st.save_image(first, jpeg_bytes(color="green"))
    time.sleep(0.05)
    second = replica("second", unattached_photo_grace_s=0.01)
    with pytest.raises(st.ImageNotFoundError):
        st.image_path(second, photo.sha256)
    assert sql(second, "SELECT count(*) FROM images") == [(0,)]
