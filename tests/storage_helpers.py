"""Helpers for the storage tests: users, conversations, small real images, the reply child process."""

from __future__ import annotations

import io
import json
import os
import random
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from storage import (
    ConversationRecord,
    MessageRecord,
    MessageStatus,
    Storage,
    StorageConfig,
    UserRecord,
    add_user_message,
    create_conversation,
    list_messages,
    regenerate_from,
    start_assistant_message,
    switch_branch,
    update_assistant_message,
    user_for_browser_secret,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ("sqlite", "postgresql")
"""What the ``backend`` fixture (tests/storage_fixtures.py) runs each storage test on."""
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])
"""A test of SQLite's own behaviour (its file, its pragmas, its one-writer rule)."""
postgresql_only = pytest.mark.parametrize("backend", ["postgresql"])
"""A test of what only a shared (PostgreSQL) database does."""
Configure = Callable[..., StorageConfig]
"""The ``storage_config`` fixture: ``storage_config(**options)`` for this test's data dir and backend."""


def make_user(storage: Storage, name: str) -> UserRecord:
    with storage.session() as session:
        return user_for_browser_secret(session, secret=f"secret-of-{name}-0123456789abcdef")


def make_conversation(storage: Storage, owner: UserRecord, **kwargs: object) -> ConversationRecord:
    with storage.session() as session:
        return create_conversation(session, owner_id=owner.id, **kwargs)


def ask(
    storage: Storage, owner: UserRecord, conversation: ConversationRecord, text: str = "What is this?"
) -> MessageRecord:
    """Add a question, so that a reply can start."""
    with storage.session() as session:
        return add_user_message(session, owner_id=owner.id, conversation_id=conversation.id, text=text)


def jpeg_bytes(size: tuple[int, int] = (64, 48), color: str = "red", **save_options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", **save_options)
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = (32, 32), color: str = "blue") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


ORIENTATION, MAKE, GPS_IFD = 0x0112, 0x010F, 0x8825


def textured_image(size: tuple[int, int], *, seed: int, mode: str = "RGB") -> Image.Image:
    """Random pixels: unlike a flat colour, JPEG-encoding them again changes them."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, size, random.Random(seed).randbytes(size[0] * size[1] * bands))


def phone_jpeg(*, seed: int = 1, latitude: float = 52.37) -> bytes:
    """A 48x32 photo as a phone saves it: EXIF orientation 6 (turn 90° clockwise), camera make and GPS position."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[MAKE] = "SecretCam"
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (latitude, 0.0, 0.0), 3: "E", 4: (4.9, 0.0, 0.0)})
    buffer = io.BytesIO()
    textured_image((48, 32), seed=seed).save(buffer, "JPEG", exif=exif, quality=95)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(GPS_IFD)  # the input really has GPS
    return data


def png_with_metadata(*, seed: int = 2) -> bytes:
    """An RGBA screenshot-like PNG carrying a text chunk with a location."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Location", "52.37N 4.90E")
    buffer = io.BytesIO()
    textured_image((24, 20), seed=seed, mode="RGBA").save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


@dataclass(frozen=True)
class ReplyChild:
    """tests/storage_reply_child.py, running: it holds the data directory with a reply half written."""

    process: subprocess.Popen
    owner_id: int
    conversation_id: str
    message_id: int

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=10) == -signal.SIGKILL


@contextmanager
def reply_child(data_dir: Path, *, database_url: str | None = None) -> Iterator[ReplyChild]:
    """Start the child on ``data_dir`` (and ``database_url``, else SQLite there) and wait until its
    partial reply is stored; kill it on the way out."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "storage_reply_child.py"), str(data_dir),
         *([database_url] if database_url else [])],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=30), "child did not report READY in 30 s"
        line = child.stdout.readline()
        assert line.startswith("READY"), (line, child.stderr.read() if child.poll() is not None else "")
        _, owner_id, conversation_id, message_id = line.split()
        yield ReplyChild(child, int(owner_id), conversation_id, int(message_id))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        child.stdout.close(), child.stderr.close()


@dataclass(frozen=True)
class ChildResult:
    """What one tests/storage_replica_child.py reported: its exit status, JSON result and stderr."""

    returncode: int
    result: dict | None
    stderr: str


def run_replica_children(commands: list[list[str]], *, timeout: float = 120) -> list[ChildResult]:
    """Start one tests/storage_replica_child.py per command, let them all go at once, collect what they say.

    Each child imports storage and says READY first; only when every one has, all are told
    to go, so their work (migrating, writing) really overlaps.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    script = str(REPO_ROOT / "tests" / "storage_replica_child.py")
    children = [
        subprocess.Popen([sys.executable, script, *command], cwd=REPO_ROOT, env=env, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for command in commands
    ]
    try:
        for child in children:
            with selectors.DefaultSelector() as selector:
                selector.register(child.stdout, selectors.EVENT_READ)
                assert selector.select(timeout=timeout), "a child did not report READY"
            line = child.stdout.readline()
            assert line == "READY\n", (line, child.stderr.read() if child.poll() is not None else "")
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, err = child.communicate(timeout=timeout)
            lines = out.strip().splitlines()
            reported = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
            results.append(ChildResult(child.returncode, reported, err))
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)


@dataclass(frozen=True)
class Chat:
    """One person's conversation, driven one unit of work per call, as the app does."""

    storage: Storage
    owner: UserRecord
    conversation: ConversationRecord

    @classmethod
    def start(cls, storage: Storage, owner: UserRecord, **kwargs: object) -> Chat:
        return cls(storage, owner, make_conversation(storage, owner, **kwargs))

    def ask(self, text: str, *, edit_of: int | None = None, image_sha256: str | None = None) -> MessageRecord:
        with self.storage.session() as session:
            return add_user_message(
                session, owner_id=self.owner.id, conversation_id=self.conversation.id,
                text=text, image_sha256=image_sha256, edit_of=edit_of,
            )

    def answer(self, text: str) -> MessageRecord:
        with self.storage.session() as session:
            reply = start_assistant_message(session, owner_id=self.owner.id, conversation_id=self.conversation.id)
            return update_assistant_message(
                session, owner_id=self.owner.id, message_id=reply.id, text=text, status=MessageStatus.COMPLETE
            )

    def regenerate(self, question_id: int) -> list[MessageRecord]:
        with self.storage.session() as session:
            return regenerate_from(
                session, owner_id=self.owner.id, conversation_id=self.conversation.id, question_id=question_id
            )

    def switch(self, message_id: int) -> list[MessageRecord]:
        with self.storage.session() as session:
            return switch_branch(
                session, owner_id=self.owner.id, conversation_id=self.conversation.id, message_id=message_id
            )

    def path(self) -> list[MessageRecord]:
        with self.storage.session() as session:
            return list_messages(session, owner_id=self.owner.id, conversation_id=self.conversation.id)

    def texts(self) -> list[str]:
        return [message.text for message in self.path()]
