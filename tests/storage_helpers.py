"""Helpers for tests/test_storage_*.py: users, conversations and small real images."""

from __future__ import annotations

import io

from PIL import Image

from storage import (
    ConversationRecord,
    Storage,
    UserRecord,
    create_conversation,
    user_for_browser_secret,
)


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
