"""Real faults (a locked database, a full disk, a read-only disk) reach a person as one plain sentence.

No mocks: the database is locked by another connection, the disk is a 1 MB tmpfs
really filled up or really remounted read-only, the file-size limit is a real
RLIMIT_FSIZE. Mounting needs root (CI runs as root); those tests skip otherwise.
"""

from __future__ import annotations

import io
import logging
import os
import pwd
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

import storage as st
from tests.storage_helpers import REPO_ROOT, ask, make_conversation, make_user, png_bytes, textured_image

pytest_plugins = ("tests.storage_fixtures",)  # the data_dir and storage fixtures


@pytest.fixture
def backend() -> str:
    """SQLite only: faults are injected into SQLite's file and lock."""
    return "sqlite"


LEAKS = ("sqlite", "SELECT", "INSERT", "UPDATE", "BEGIN", "/", "Error", "Errno", "Traceback", "mipha.sqlite3")


def assert_for_a_person(error: st.StorageError, kind: type[st.StorageError], cause: type[BaseException]) -> None:
    assert type(error) is kind
    message = str(error)
    assert message and "\n" not in message
    assert not [leak for leak in LEAKS if leak in message], message
    assert isinstance(error.__cause__, cause)


def assert_logged(caplog: pytest.LogCaptureFixture, *details: str) -> None:
    """The operator's log has the original error: its text, SQL or path, and traceback."""
    logged = [r for r in caplog.records if r.name == "storage.failures" and r.levelno >= logging.WARNING]
    assert logged and all(r.exc_info for r in logged), "no error was logged with its traceback"
    text = "\n".join(r.getMessage() for r in logged)
    assert all(detail in text for detail in details), (details, text)


def photo(seed: int) -> bytes:
    buffer = io.BytesIO()
    textured_image((64, 64), seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


def export_of_a_new_photo(storage: st.Storage, user: st.UserRecord, seed: int) -> str:
    """An export naming a photo this data directory does not hold (deleted again right away)."""
    conversation = make_conversation(storage, user)
    image = st.save_image(storage, photo(seed))
    with storage.session() as session:
        st.add_user_message(
            session, owner_id=user.id, conversation_id=conversation.id, text="x", image_sha256=image.sha256
        )
        document = st.export_json(session, storage=storage, owner_id=user.id, conversation_id=conversation.id)
    with storage.session() as session:
        st.delete_conversation(session, owner_id=user.id, conversation_id=conversation.id)
    return document


def add_message(storage: st.Storage, user: st.UserRecord, conversation: st.ConversationRecord, text: str) -> None:
    with storage.session() as session:
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text=text)


def stray_files(storage: st.Storage) -> list[Path]:
    return list(storage.images_dir.rglob(".tmp-*"))


# --- (a) a database held locked by another writer --------------------------------------------


@pytest.fixture
def impatient(data_dir: Path) -> Iterator[st.Storage]:
    with st.open_storage(st.StorageConfig(data_dir=data_dir, busy_timeout_ms=200)) as opened:
        yield opened


@pytest.fixture
def write_lock(impatient: st.Storage) -> Iterator[sqlite3.Connection]:
    """Another connection (think: a backup tool, the sqlite3 shell) holding the write lock."""
    other = sqlite3.connect(impatient.config.data_dir / "mipha.sqlite3", isolation_level=None)
    yield other
    other.close()


def test_a_locked_database_is_busy_not_a_traceback(
    impatient: st.Storage, write_lock: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    user = make_user(impatient, "ana")
    conversation = make_conversation(impatient, user)
    document = export_of_a_new_photo(impatient, user, seed=1)
    ask(impatient, user, conversation)
    writer = st.ReplyWriter.start(impatient, owner_id=user.id, conversation_id=conversation.id, max_pending_tokens=1)
    write_lock.execute("BEGIN IMMEDIATE")

    attempts = {
        "message": lambda: add_message(impatient, user, conversation, "Hello?"),
        "photo": lambda: st.save_image(impatient, png_bytes()),
        "import": lambda: st.import_json(impatient, owner_id=user.id, data=document),
        "reply": lambda: writer.append("Hel"),
    }
    for attempt in attempts.values():
        with pytest.raises(st.StorageBusyError) as busy:
            attempt()
        assert_for_a_person(busy.value, st.StorageBusyError, DBAPIError)
    assert str(busy.value) == "The conversation database is busy; try again in a few seconds."
    assert_logged(caplog, "database is locked", "BEGIN IMMEDIATE")

    write_lock.execute("COMMIT")  # the other writer is done: everything works again
    writer.append("lo!")
    assert writer.finish().text == "Hello!"
    add_message(impatient, user, conversation, "Hello?")


def test_a_reply_that_cannot_be_saved_stops_the_stream(
    impatient: st.Storage, write_lock: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    user = make_user(impatient, "ana")
    conversation = make_conversation(impatient, user)
    ask(impatient, user, conversation)
    with pytest.raises(st.StorageBusyError), st.ReplyWriter.start(
        impatient, owner_id=user.id, conversation_id=conversation.id, max_pending_tokens=1
    ) as writer:
        writer.append("Saved, ")
        write_lock.execute("BEGIN IMMEDIATE")
        writer.append("then not.")  # raises: the caller stops generating and shows the message
    assert writer.text == "Saved, then not."
    assert "could not record the end of reply" in caplog.text  # the writer's last try failed too
    write_lock.execute("COMMIT")
    with impatient.session() as session:
        (_, reply) = st.list_messages(session, owner_id=user.id, conversation_id=conversation.id)
    assert (reply.status, reply.text) == (st.MessageStatus.PARTIAL, "Saved, ")  # interrupted at next start


# --- a tiny real disk ------------------------------------------------------------------------


def mount_tmpfs(path: Path, *, size: str) -> None:
    path.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True, text=True, timeout=30,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: the disk-full and read-only tests need a real tmpfs")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True, timeout=30)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    mount_tmpfs(disk, size="1m")
    yield disk
    # lazy: a test that failed with a file still open must not leave the mount behind
    subprocess.run(["umount", "-l", str(disk)], check=True, capture_output=True, timeout=30)


@pytest.fixture
def on_tiny_disk(tiny_disk: Path) -> Iterator[st.Storage]:
    with st.open_storage(st.StorageConfig(data_dir=tiny_disk / "data")) as opened:
        yield opened


def fill_up(disk: Path) -> Path:
    """Write a file until the disk refuses another byte; returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
    return filler


# --- (b) disk full ---------------------------------------------------------------------------


def test_a_full_disk_says_so_and_nothing_is_half_written(
    on_tiny_disk: st.Storage, tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = on_tiny_disk
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user)
    document = export_of_a_new_photo(storage, user, seed=2)
    ask(storage, user, conversation)
    writer = st.ReplyWriter.start(storage, owner_id=user.id, conversation_id=conversation.id, max_pending_tokens=1)
    checkpoint = sqlite3.connect(storage.config.data_dir / "mipha.sqlite3")
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # an empty WAL: the next write needs new space
    checkpoint.close()
    filler = fill_up(tiny_disk)

    attempts = {
        "message": lambda: add_message(storage, user, conversation, "é" * 5_000),
        "photo": lambda: st.save_image(storage, photo(seed=3)),
        "import": lambda: st.import_json(storage, owner_id=user.id, data=document),
        "reply": lambda: writer.append("A long answer " * 500),
    }
    for name, attempt in attempts.items():
        with pytest.raises(st.StorageFullError) as full:
            attempt()
        assert_for_a_person(full.value, st.StorageFullError, OSError if name in ("photo", "import") else DBAPIError)
        assert not stray_files(storage), name
    assert str(full.value).startswith("The server's disk is full")
    assert_logged(caplog, "database or disk is full", "No space left on device", str(storage.images_dir))

    filler.unlink()  # space again: the same requests succeed
    add_message(storage, user, conversation, "é" * 5_000)
    st.save_image(storage, photo(seed=3))
    st.import_json(storage, owner_id=user.id, data=document)


@pytest.mark.timeout(60)
def test_a_file_size_limit_is_reported_as_a_full_disk(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (with SIGXFSZ ignored) makes writes fail with EFBIG; no mount or root needed."""
    code = (
        "import sys, storage as st\n"
        "from pathlib import Path\n"
        "opened = st.open_storage(st.StorageConfig(data_dir=Path(sys.argv[1])))\n"
        "try:\n"
        "    st.save_image(opened, Path(sys.argv[2]).read_bytes())\n"
        "except st.StorageError as e:\n"
        "    print(type(e).__name__, type(e.__cause__).__name__, e, sep='|')\n"
    )
    big = tmp_path / "big.png"
    textured_image((400, 400), seed=4).save(big, "PNG")  # ~480 KB of noise: stays big as PNG

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "data"), str(big)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=limit_file_size, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    kind, cause, message = result.stdout.strip().split("|")
    assert (kind, cause) == ("StorageFullError", "OSError")
    assert message == str(st.StorageFullError())
    assert "File too large" in result.stderr  # the details went to the log (stderr), not to the person


# --- (c) read-only ---------------------------------------------------------------------------


def test_a_read_only_disk_says_so(on_tiny_disk: st.Storage, tiny_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = on_tiny_disk
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user)
    document = export_of_a_new_photo(storage, user, seed=5)
    ask(storage, user, conversation)
    # The kernel refuses to remount while a file is open for writing; a server
    # meets the read-only disk on its next connection.
    storage.engine.dispose()
    remount(tiny_disk, "ro")
    try:
        attempts = {
            "message": lambda: add_message(storage, user, conversation, "Hello?"),
            "photo": lambda: st.save_image(storage, photo(seed=6)),
            "import": lambda: st.import_json(storage, owner_id=user.id, data=document),
            "reply": lambda: st.ReplyWriter.start(storage, owner_id=user.id, conversation_id=conversation.id),
        }
        for name, attempt in attempts.items():
            with pytest.raises(st.StorageReadOnlyError) as read_only:
                attempt()
            assert_for_a_person(read_only.value, st.StorageReadOnlyError, OSError if name == "photo" else DBAPIError)
        assert str(read_only.value).startswith("The server cannot write its data")
        assert_logged(caplog, "unable to open database file", "Read-only file system", str(storage.images_dir))
    finally:
        storage.engine.dispose()
        remount(tiny_disk, "rw")


# --- start-up: a data directory that cannot be created or written ---------------------------


@pytest.mark.parametrize("exists", [False, True], ids=["to-create", "existing"])
def test_a_read_only_data_dir_is_refused_at_start_up_with_the_way_out(tiny_disk: Path, exists: bool) -> None:
    data_dir = tiny_disk / "data"
    if exists:
        st.open_storage(st.StorageConfig(data_dir=data_dir)).close()
    remount(tiny_disk, "ro")
    with pytest.raises(st.DataDirNotWritableError) as refused:
        st.open_storage(st.StorageConfig(data_dir=data_dir))
    assert str(refused.value) == (
        f"Mipha Chat cannot write to its data directory {data_dir}/ (read-only file system). "
        "Make it writable (or free some disk space), or choose another --data-dir."
    )


def open_in_child(data_dir: Path, *, as_user: str | None) -> str:
    """open_storage in a forked child, as ``as_user`` if given; returns "ErrorClass|message" or "opened"."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            if as_user is not None:
                account = pwd.getpwnam(as_user)
                os.setgid(account.pw_gid)
                os.setuid(account.pw_uid)
            st.open_storage(st.StorageConfig(data_dir=data_dir)).close()
            outcome = "opened"
        except BaseException as e:  # noqa: BLE001 - reported to the parent as is
            outcome = f"{type(e).__name__}|{e}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


@pytest.mark.timeout(60)
def test_a_data_dir_the_server_may_not_create_is_refused_at_start_up() -> None:
    """As root, the server runs as nobody below a root-owned folder; otherwise that folder is made read-only."""
    as_root = os.geteuid() == 0
    parent = Path(tempfile.mkdtemp(prefix="mipha-root-owned-"))
    try:
        parent.chmod(0o755 if as_root else 0o555)
        outcome = open_in_child(parent / "data", as_user="nobody" if as_root else None)
    finally:
        parent.chmod(0o755)
        parent.rmdir()
    assert outcome == (
        f"DataDirNotWritableError|Mipha Chat cannot write to its data directory {parent}/data/ "
        "(permission denied). Make it writable (or free some disk space), or choose another --data-dir."
    )
