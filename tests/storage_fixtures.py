"""Shared fixtures and helpers for the storage tests (imported by tests/test_storage_*.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from storage import (
    ConversationRecord,
    Storage,
    StorageConfig,
    StorageLimits,
    UserRecord,
    create_conversation,
    open_storage,
    user_for_browser_secret,
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def storage(data_dir: Path) -> Iterator[Storage]:
    opened = open_storage(StorageConfig(data_dir=data_dir))
    yield opened
    opened.close()


def make_user(storage: Storage, name: str) -> UserRecord:
    with storage.session() as session:
        return user_for_browser_secret(session, secret=f"secret-of-{name}-0123456789abcdef")


def make_conversation(storage: Storage, owner: UserRecord, **kwargs: object) -> ConversationRecord:
    with storage.session() as session:
        return create_conversation(session, owner_id=owner.id, **kwargs)


def jpeg_bytes(size: tuple[int, int] = (64, 48), color: str = "red", **save_options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", **save_options)
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = (32, 32), color: str = "blue") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def small_limits(**overrides: int) -> StorageLimits:
    return StorageLimits(**overrides)
