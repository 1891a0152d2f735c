"""Export and import as files: one conversation, all of them as a zip, and hostile zips."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

import storage as db
from app.transfer import (
    MAX_ZIP_ENTRIES,
    export_all,
    export_conversation,
    file_stem,
    import_files,
)
from storage import StorageConfig, StorageLimits, open_storage


@pytest.fixture
def store(tmp_path: Path):
    storage = open_storage(StorageConfig(data_dir=tmp_path / "data", limits=StorageLimits(max_import_bytes=200_000)))
    yield storage
    storage.close()


def _owner(storage: db.Storage, name: str) -> int:
    with storage.session() as s:
        return db.user_for_browser_secret(s, secret=f"secret-of-{name}-0123456789abcdef").id


def _conversation(storage: db.Storage, owner: int, question: str) -> str:
    with storage.session() as s:
        conversation = db.create_conversation(s, owner_id=owner)
        db.add_user_message(s, owner_id=owner, conversation_id=conversation.id, text=question)
        reply = db.start_assistant_message(s, owner_id=owner, conversation_id=conversation.id)
        db.update_assistant_message(s, owner_id=owner, message_id=reply.id, text=f"About {question}",
                                    status=db.MessageStatus.COMPLETE)
    return conversation.id


def _titles(storage: db.Storage, owner: int) -> list[str]:
    with storage.session() as s:
        return sorted(c.title for c in db.list_conversations(s, owner_id=owner))


def test_one_conversation_exports_as_markdown_and_json_named_after_its_title(store, tmp_path):
    owner = _owner(store, "alice")
    conversation = _conversation(store, owner, "What is on the table?")
    markdown = export_conversation(store, owner_id=owner, conversation_id=conversation, format="markdown",
                                   into=tmp_path / "out")
    document = export_conversation(store, owner_id=owner, conversation_id=conversation, format="json",
                                   into=tmp_path / "out")
    assert markdown.name == "What is on the table.md" and "About What is on the table?" in markdown.read_text()
    assert document.suffix == ".json" and json.loads(document.read_text())["messages"][0]["text"] == \
        "What is on the table?"
    assert markdown.parent != document.parent  # every export in a fresh folder: no overwrites


def test_export_all_then_import_gives_every_conversation_back(store, tmp_path):
    alice, bob = _owner(store, "alice"), _owner(store, "bob")
    for question in ("First", "Second", "Third"):
        _conversation(store, alice, question)
    archive = export_all(store, owner_id=alice, into=tmp_path / "out")
    assert archive is not None and len(zipfile.ZipFile(archive).namelist()) == 3
    report = import_files(store, owner_id=bob, paths=[archive])
    assert report.refused == []
    assert _titles(store, bob) == ["First", "Second", "Third"]
    assert export_all(store, owner_id=_owner(store, "carol"), into=tmp_path / "out") is None


def test_a_bad_file_is_named_and_the_good_ones_still_import(store, tmp_path):
    owner = _owner(store, "alice")
    good = export_conversation(store, owner_id=owner, conversation_id=_conversation(store, owner, "Kept"),
                               format="json", into=tmp_path / "out")
    bad = tmp_path / "notes.json"
    bad.write_text("{not json")
    report = import_files(store, owner_id=_owner(store, "bob"), paths=[bad, good])
    assert [c.title for c in report.imported] == ["Kept"]
    assert len(report.refused) == 1 and report.refused[0].startswith("notes.json: ")


def test_a_zip_bomb_entry_is_refused_without_reading_it_whole(store, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("huge.json", b"{" + b" " * 50_000_000 + b"}")  # 50 MB of spaces, ~50 KB compressed
    assert bomb.stat().st_size < 200_000
    report = import_files(store, owner_id=_owner(store, "alice"), paths=[bomb])
    assert report.imported == [] and report.refused == ["huge.json: it is larger than the 0.2 MB import limit."]


def test_a_zip_header_that_lies_about_its_size_is_still_cut_at_the_limit(store, tmp_path):
    payload = b"{" + b" " * 1_000_000 + b"}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("liar.json", payload)
    data = bytearray(buffer.getvalue())
    # the central directory's uncompressed size (offset 24 of its entry) now claims 10 bytes
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    report = import_files(store, owner_id=_owner(store, "alice"), paths=[liar])
    assert report.imported == [] and len(report.refused) == 1


def test_too_many_entries_are_refused_as_a_whole(store, tmp_path):
    crowded = tmp_path / "crowded.zip"
    with zipfile.ZipFile(crowded, "w") as archive:
        for number in range(MAX_ZIP_ENTRIES + 1):
            archive.writestr(f"{number}.json", "{}")
    report = import_files(store, owner_id=_owner(store, "alice"), paths=[crowded])
    assert report.imported == [] and str(MAX_ZIP_ENTRIES) in report.refused[0]


@pytest.mark.parametrize(("title", "stem"), [("../../etc/passwd", "etcpasswd"), ("   ", "conversation"),
                                             ("Café: été?", "Café été"), ("a" * 100, "a" * 60)])
def test_file_names_from_titles_cannot_leave_the_folder(title, stem):
    assert file_stem(title) == stem
