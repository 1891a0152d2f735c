"""Export to Markdown and JSON, import back, and refusal of malformed or hostile files."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import storage as st
from tests.storage_helpers import (
    Configure,
    jpeg_bytes,
    make_conversation,
    make_user,
    phone_jpeg,
    png_bytes,
    png_with_metadata,
)

pytest_plugins = ("tests.storage_fixtures",)  # the backend, data_dir, storage_config and storage fixtures


@pytest.fixture
def exported(storage: st.Storage) -> tuple[st.UserRecord, st.ConversationRecord, dict[str, Any]]:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user, model_id="zhumj34/Mipha-3B", settings={"temperature": 0.2})
    photo = st.save_image(storage, jpeg_bytes(color="orange"))
    with storage.session() as session:
        st.add_user_message(
            session, owner_id=user.id, conversation_id=conversation.id, text="What is this?", image_sha256=photo.sha256
        )
    with st.ReplyWriter.start(storage, owner_id=user.id, conversation_id=conversation.id) as writer:
        writer.append("An orange square.")
        writer.finish(finish_reason="stop", prompt_tokens=12, completion_tokens=4, reused_tokens=9)
    with storage.session() as session:
        text = st.export_json(session, storage=storage, owner_id=user.id, conversation_id=conversation.id)
        conversation = st.get_conversation(session, owner_id=user.id, conversation_id=conversation.id)
    return user, conversation, json.loads(text)


def snapshot(storage: st.Storage) -> tuple[int, int, list[str]]:
    """What an import could change: tables and files."""
    with storage.engine.connect() as connection:
        conversations = connection.exec_driver_sql("SELECT count(*) FROM conversations").scalar()
        messages = connection.exec_driver_sql("SELECT count(*) FROM messages").scalar()
    files = sorted(str(p.relative_to(storage.images_dir)) for p in storage.images_dir.rglob("*") if p.is_file())
    return conversations, messages, files


def test_json_round_trip_keeps_everything(storage: st.Storage, exported) -> None:
    user, original, document = exported
    assert document["format"] == "mipha-chat-conversation" and document["version"] == 1
    assert document["messages"][0]["image"]["data_uri"].startswith("data:image/jpeg;base64,")

    other = make_user(storage, "bob")
    imported = st.import_json(storage, owner_id=other.id, data=json.dumps(document).encode())
    assert imported.id != original.id and imported.owner_id == other.id
    assert (imported.title, imported.model_id, imported.settings, imported.created_at) == (
        original.title, original.model_id, original.settings, original.created_at,
    )
    with storage.session() as session:
        before = st.list_messages(session, owner_id=user.id, conversation_id=original.id)
        after = st.list_messages(session, owner_id=other.id, conversation_id=imported.id)
    fields = ("position", "role", "text", "status", "finish_reason", "prompt_tokens", "completion_tokens",
              "reused_tokens", "first_token_seconds", "duration_seconds", "created_at")
    assert [[getattr(m, f) for f in fields] for m in after] == [[getattr(m, f) for f in fields] for m in before]
    with Image.open(st.image_path(storage, after[0].image_sha256)) as image:
        assert image.size == (64, 48)


def test_reused_tokens_survive_finish_list_export_and_import(storage: st.Storage, exported) -> None:
    user, original, document = exported
    with storage.session() as session:
        question, reply = st.list_messages(session, owner_id=user.id, conversation_id=original.id)
    assert (question.reused_tokens, reply.reused_tokens) == (None, 9)
    assert [m["reused_tokens"] for m in document["messages"]] == [None, 9]

    imported = st.import_json(storage, owner_id=user.id, data=json.dumps(document))
    del document["messages"][1]["reused_tokens"]  # exports from before the field existed
    older = st.import_json(storage, owner_id=user.id, data=json.dumps(document))
    with storage.session() as session:
        assert st.list_messages(session, owner_id=user.id, conversation_id=imported.id)[1].reused_tokens == 9
        assert st.list_messages(session, owner_id=user.id, conversation_id=older.id)[1].reused_tokens is None


def test_markdown_export(storage: st.Storage, exported) -> None:
    user, conversation, _ = exported
    with storage.session() as session:
        text = st.export_markdown(session, storage=storage, owner_id=user.id, conversation_id=conversation.id)
        plain = st.export_markdown(
            session, storage=storage, owner_id=user.id, conversation_id=conversation.id, embed_images=False
        )
    assert text.startswith("# What is this?\n")
    assert "**You:**" in text and "**Mipha:**" in text and "An orange square." in text
    assert "![photo](data:image/jpeg;base64," in text
    assert "data:" not in plain and "_[photo " in plain


def test_exports_are_owner_scoped(storage: st.Storage, exported) -> None:
    _, conversation, _ = exported
    stranger = make_user(storage, "eve")
    with storage.session() as session:
        for export in (st.export_json, st.export_markdown):
            with pytest.raises(st.ConversationNotFoundError):
                export(session, storage=storage, owner_id=stranger.id, conversation_id=conversation.id)


def bad_base64(doc: dict) -> None:
    doc["messages"][0]["image"]["data_uri"] = "data:image/png;base64,abc"


def bomb(doc: dict) -> None:
    buffer = io.BytesIO()
    Image.new("1", (8_000, 8_000)).save(buffer, "PNG")
    doc["messages"][0]["image"]["data_uri"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def not_an_image(doc: dict) -> None:
    doc["messages"][0]["image"]["data_uri"] = "data:image/png;base64," + base64.b64encode(b"<svg>hi</svg>").decode()


def second_message_broken(doc: dict) -> None:
    """The first message (with a new photo) is valid; the last one is not."""
    doc["messages"][0]["image"]["data_uri"] = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    doc["messages"][1]["completion_tokens"] = -1


HOSTILE = {
    "not json": lambda doc: "{not json",
    "not utf-8": lambda doc: b"\xff\xfe{}",
    "a list": lambda doc: [],
    "NaN": lambda doc: json.dumps(doc).replace('"temperature": 0.2', '"temperature": NaN'),
    "deep nesting": lambda doc: "[" * 100_000 + "]" * 100_000,
    "wrong format": lambda doc: doc.update(format="something-else"),
    "future version": lambda doc: doc.update(version=2),
    "unknown top field": lambda doc: doc.update(extra=1),
    "title not text": lambda doc: doc["conversation"].update(title=["x"]),
    "empty title": lambda doc: doc["conversation"].update(title="  "),
    "huge title": lambda doc: doc["conversation"].update(title="x" * 100_000),
    "settings a list": lambda doc: doc["conversation"].update(settings=[1, 2]),
    "huge settings": lambda doc: doc["conversation"].update(settings={"x": "y" * 100_000}),
    "bad timestamp": lambda doc: doc["conversation"].update(created_at="yesterday"),
    "messages not a list": lambda doc: doc.update(messages={"0": {}}),
    "message not an object": lambda doc: doc["messages"].append("hello"),
    "bad role": lambda doc: doc["messages"][0].update(role="system"),
    "text a number": lambda doc: doc["messages"][0].update(text=42),
    "huge text": lambda doc: doc["messages"][0].update(text="x" * 30_000),
    "token count a bool": lambda doc: doc["messages"][1].update(prompt_tokens=True),
    "negative reused tokens": lambda doc: doc["messages"][1].update(reused_tokens=-1),
    "reused tokens as text": lambda doc: doc["messages"][1].update(reused_tokens="9"),
    "negative seconds": lambda doc: doc["messages"][1].update(duration_seconds=-1),
    "path field": lambda doc: doc["messages"][0]["image"].update(path="../../x"),
    "path as image": lambda doc: doc["messages"][0]["image"].update(data_uri="../../x"),
    "file uri": lambda doc: doc["messages"][0]["image"].update(data_uri="file:///etc/passwd"),
    "svg data uri": lambda doc: doc["messages"][0]["image"].update(data_uri="data:image/svg+xml;base64,PHN2Zz4="),
    "bad base64": bad_base64,
    "not an image": not_an_image,
    "decompression bomb": bomb,
    "last message broken": second_message_broken,
}


@pytest.mark.parametrize("corrupt", HOSTILE.values(), ids=HOSTILE.keys())
def test_malformed_or_hostile_imports_are_refused_and_change_nothing(storage: st.Storage, exported, corrupt) -> None:
    user, _, document = exported
    document = copy.deepcopy(document)
    result = corrupt(document)
    data = result if result is not None else json.dumps(document)
    if not isinstance(data, (str, bytes)):
        data = json.dumps(data)
    before = snapshot(storage)
    with pytest.raises((st.InvalidImportError, st.LimitExceededError)) as error:
        st.import_json(storage, owner_id=user.id, data=data)
    assert isinstance(error.value, st.StorageError)
    assert str(error.value) and "Traceback" not in str(error.value)
    assert snapshot(storage) == before


def test_import_error_names_the_field(storage: st.Storage, exported) -> None:
    user, _, document = exported
    document["messages"][1]["role"] = "system"
    with pytest.raises(st.InvalidImportError, match=r"messages\[1\]\.role") as error:
        st.import_json(storage, owner_id=user.id, data=json.dumps(document))
    assert "Nothing was changed" in str(error.value)


def test_import_respects_the_conversation_limit(storage_config: Configure) -> None:
    opened = st.open_storage(storage_config(limits=st.StorageLimits(max_conversations_per_user=1)))
    user = make_user(opened, "ana")
    conversation = make_conversation(opened, user)
    with opened.session() as session:
        document = st.export_json(session, storage=opened, owner_id=user.id, conversation_id=conversation.id)
    with pytest.raises(st.LimitExceededError, match="Delete some old ones"):
        st.import_json(opened, owner_id=user.id, data=document)
    opened.close()


def test_oversized_import_file_is_refused_before_parsing(storage_config: Configure) -> None:
    opened = st.open_storage(storage_config(limits=st.StorageLimits(max_import_bytes=1_000)))
    user = make_user(opened, "ana")
    with pytest.raises(st.LimitExceededError) as error:
        st.import_json(opened, owner_id=user.id, data=b" " * 1_001)
    assert error.value.limit_name == "max_import_bytes"
    opened.close()


def test_partial_replies_are_imported_as_interrupted(storage: st.Storage, exported) -> None:
    user, _, document = exported
    document["messages"][1]["status"] = "partial"
    imported = st.import_json(storage, owner_id=user.id, data=json.dumps(document))
    with storage.session() as session:
        reply = st.list_messages(session, owner_id=user.id, conversation_id=imported.id)[1]
    assert reply.status is st.MessageStatus.INTERRUPTED


# --- round trips with real photos ----------------------------------------------------------------


def stored_photos(storage: st.Storage) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in storage.images_dir.rglob("*") if p.is_file()}


def pixels(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, image.size, image.tobytes()


def assert_clean_and_content_addressed(storage: st.Storage, messages: list[st.MessageRecord]) -> None:
    """Every photo a message names is stored under the SHA-256 of its bytes, with no metadata."""
    with storage.session() as session:
        for sha256 in {m.image_sha256 for m in messages if m.image_sha256}:
            data = st.image_path(storage, sha256).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha256
            assert st.get_image(session, sha256=sha256).size_bytes == len(data)
            with Image.open(io.BytesIO(data)) as image:
                assert not image.getexif() and not set(image.info) & {"exif", "xmp", "icc_profile", "comment"}
                assert not getattr(image, "text", None)
            assert b"Exif" not in data and b"SecretCam" not in data and b"Location" not in data


def conversation_with_photos(storage: st.Storage) -> tuple[st.UserRecord, st.ConversationRecord, dict[str, bytes]]:
    user = make_user(storage, "ana")
    conversation = make_conversation(storage, user, model_id="zhumj34/Mipha-3B", settings={"temperature": 0.7})
    photo, screenshot = st.save_image(storage, phone_jpeg()), st.save_image(storage, png_with_metadata())
    assert (photo.format, photo.width, photo.height, screenshot.format) == ("JPEG", 32, 48, "PNG")
    for text, image in (("Where was this taken?", photo), ("And this one?", screenshot)):
        with storage.session() as session:
            st.add_user_message(
                session, owner_id=user.id, conversation_id=conversation.id, text=text, image_sha256=image.sha256
            )
        with st.ReplyWriter.start(storage, owner_id=user.id, conversation_id=conversation.id) as writer:
            writer.append(f"An answer to {text!r}")
    with storage.session() as session:
        conversation = st.get_conversation(session, owner_id=user.id, conversation_id=conversation.id)
    return user, conversation, stored_photos(storage)


def photo_pixels(storage: st.Storage, sha256: str | None) -> tuple | None:
    return None if sha256 is None else pixels(st.image_path(storage, sha256).read_bytes())


def contents(storage: st.Storage, owner_id: int, conversation_id: str) -> tuple:
    """What a person sees of a conversation, photos as decoded pixels."""
    with storage.session() as session:
        conversation = st.get_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
        messages = st.list_messages(session, owner_id=owner_id, conversation_id=conversation_id)
    shown = [
        (m.position, m.role, m.text, m.status, photo_pixels(storage, m.image_sha256))
        for m in messages
    ]
    return (conversation.title, conversation.model_id, conversation.settings), shown


def test_photos_round_trip_into_the_same_and_a_fresh_data_dir(storage: st.Storage, tmp_path: Path) -> None:
    user, original, photos = conversation_with_photos(storage)
    expected = contents(storage, user.id, original.id)
    assert [bool(image) for *_, image in expected[1]] == [True, False, True, False]
    with storage.session() as session:
        document = st.export_json(session, storage=storage, owner_id=user.id, conversation_id=original.id)

    again = st.import_json(storage, owner_id=user.id, data=document)
    assert contents(storage, user.id, again.id) == expected
    assert stored_photos(storage) == photos  # the photos were found, not stored a second time

    with st.open_storage(st.StorageConfig(data_dir=tmp_path / "fresh")) as fresh:
        newcomer = make_user(fresh, "bob")
        first = st.import_json(fresh, owner_id=newcomer.id, data=document.encode())
        second = st.import_json(fresh, owner_id=newcomer.id, data=document)
        assert contents(fresh, newcomer.id, first.id) == contents(fresh, newcomer.id, second.id) == expected
        assert stored_photos(fresh) == photos  # byte for byte, under the same names
        with fresh.session() as session:
            messages = st.list_messages(session, owner_id=newcomer.id, conversation_id=first.id)
            markdown = st.export_markdown(session, storage=fresh, owner_id=newcomer.id, conversation_id=first.id)
        assert_clean_and_content_addressed(fresh, messages)
        assert markdown.count("![photo](data:image/jpeg;base64,") == 1
        assert markdown.count("![photo](data:image/png;base64,") == 1
        assert "**Mipha:**" in markdown and "An answer to 'And this one?'" in markdown
    with storage.session() as session:
        messages = st.list_messages(session, owner_id=user.id, conversation_id=again.id)
    assert_clean_and_content_addressed(storage, messages)


def with_photo(document: str, data: bytes, mime: str) -> str:
    edited = json.loads(document)
    edited["messages"][0]["image"]["data_uri"] = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return json.dumps(edited)


@pytest.mark.parametrize(
    ("name", "photo", "mime"),
    [
        ("phone photo with GPS", phone_jpeg(seed=7), "image/jpeg"),
        ("PNG with a location chunk", png_with_metadata(seed=8), "image/png"),
        ("JPEG with bytes after its end", jpeg_bytes(color="teal") + b"Location: 52.37N", "image/jpeg"),
    ],
)
def test_an_imported_photo_with_metadata_is_cleaned_like_an_upload(
    storage: st.Storage, exported, name: str, photo: bytes, mime: str
) -> None:
    user, _, document = exported
    imported = st.import_json(storage, owner_id=user.id, data=with_photo(json.dumps(document), photo, mime))
    with storage.session() as session:
        messages = st.list_messages(session, owner_id=user.id, conversation_id=imported.id)
    assert messages[0].image_sha256 == st.save_image(storage, photo).sha256  # the same as uploading it
    assert_clean_and_content_addressed(storage, messages)
