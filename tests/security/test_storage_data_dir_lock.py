"""One server per data directory: a second open_storage is refused before it touches anything."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

import storage as st
from tests.storage_helpers import ask, make_conversation, make_user, png_bytes, reply_child

pytest_plugins = ("tests.storage_fixtures",)  # the data_dir and storage fixtures


@pytest.fixture
def backend() -> str:
    """SQLite only: the data directory's lock guards SQLite's one-writer rule."""
    return "sqlite"


def reply_status(data_dir: Path, message_id: int) -> str:
    """Read the database directly, without opening (and so without recovering) the data directory."""
    with sqlite3.connect(f"file:{data_dir / 'mipha.sqlite3'}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()[0]


def test_a_second_open_in_this_process_leaves_the_first_ones_live_data_alone(
    storage: st.Storage, data_dir: Path
) -> None:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user)
    ask(storage, user, conversation)
    writer = st.ReplyWriter.start(storage, owner_id=user.id, conversation_id=conversation.id)
    writer.append("Half a repl")
    writer.flush()
    upload = st.save_image(storage, png_bytes())  # uploaded, its message not sent yet

    with pytest.raises(st.DataDirInUseError) as refused:
        st.open_storage(st.StorageConfig(data_dir=data_dir))

    assert isinstance(refused.value, st.DataDirError) and isinstance(refused.value, st.StorageError)
    assert refused.value.pid == os.getpid()
    message = str(refused.value)
    assert re.fullmatch(
        rf"Another Mipha Chat server \(pid {os.getpid()}, started \d\d:\d\d\) is using the data directory "
        rf"{re.escape(str(data_dir))}/\. Stop it first, or start this one with another --data-dir\.",
        message,
    ), message
    assert reply_status(data_dir, writer.message.id) == "partial"
    assert st.image_path(storage, upload.sha256).is_file()
    writer.append("y.")
    assert writer.finish().text == "Half a reply."


def test_close_releases_the_lock(data_dir: Path) -> None:
    config = st.StorageConfig(data_dir=data_dir)
    first = st.open_storage(config)
    holder = json.loads((data_dir / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["started"]
    first.close()
    first.close()  # idempotent
    with st.open_storage(config) as second:
        make_user(second, "ana")


def test_a_failed_open_releases_the_lock(data_dir: Path) -> None:
    config = st.StorageConfig(data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'no-such-dir' / 'db.sqlite3'}")
    with pytest.raises(st.StorageReadOnlyError):  # SQLite: "unable to open database file"
        st.open_storage(config)
    with st.open_storage(st.StorageConfig(data_dir=data_dir)) as opened:
        make_user(opened, "ana")


@pytest.mark.timeout(60)
def test_another_process_is_refused_and_its_lock_dies_with_it(data_dir: Path) -> None:
    with reply_child(data_dir) as child:
        with pytest.raises(st.DataDirInUseError, match=rf"\(pid {child.process.pid}, started \d\d:\d\d\)") as refused:
            st.open_storage(st.StorageConfig(data_dir=data_dir))
        assert refused.value.pid == child.process.pid
        assert reply_status(data_dir, child.message_id) == "partial"  # its reply is still streaming
        child.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock

    with st.open_storage(st.StorageConfig(data_dir=data_dir)) as reopened, reopened.session() as session:
        _, reply = st.list_messages(session, owner_id=child.owner_id, conversation_id=child.conversation_id)
    assert reply.status is st.MessageStatus.INTERRUPTED
