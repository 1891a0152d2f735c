"""Export and import as files a person downloads or uploads: one conversation (Markdown, JSON) or all (zip).

The files are written under Gradio's temporary directory, which the server sweeps; what a
person uploads is read within the storage's import limits, a zip entry by entry.
"""

from __future__ import annotations

import re
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import storage as db

ExportFormat = Literal["markdown", "json"]
MAX_ZIP_ENTRIES = 1_000
_UNSAFE_NAME = re.compile(r"[^\w\- ]+")


@dataclass(frozen=True)
class ImportReport:
    """What an import did: the conversations added (newest last) and one sentence per refused file."""

    imported: list[db.ConversationRecord]
    refused: list[str]


def export_conversation(storage: db.Storage, *, owner_id: int, conversation_id: str, format: ExportFormat,
                        into: Path) -> Path:
    """The conversation as a Markdown or JSON file under `into`; its name comes from the title."""
    with storage.session() as s:
        title = db.get_conversation(s, owner_id=owner_id, conversation_id=conversation_id).title
        if format == "markdown":
            text = db.export_markdown(s, storage=storage, owner_id=owner_id, conversation_id=conversation_id)
        else:
            text = db.export_json(s, storage=storage, owner_id=owner_id, conversation_id=conversation_id)
    path = _fresh_dir(into) / f"{file_stem(title)}.{'md' if format == 'markdown' else 'json'}"
    path.write_text(text, encoding="utf-8")
    return path


def export_all(storage: db.Storage, *, owner_id: int, into: Path) -> Path | None:
    """Every conversation as JSON files in one zip (importable again); None when there are none."""
    with storage.session() as s:
        conversations = db.list_conversations(s, owner_id=owner_id)
    if not conversations:
        return None
    path = _fresh_dir(into) / "mipha-chat-conversations.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for number, conversation in enumerate(conversations, start=1):
            with storage.session() as s:
                text = db.export_json(s, storage=storage, owner_id=owner_id, conversation_id=conversation.id)
            archive.writestr(f"{number:04d} {file_stem(conversation.title)}.json", text)
    return path


def import_files(storage: db.Storage, *, owner_id: int, paths: list[Path]) -> ImportReport:
    """Import exported JSON files, or zips of them; a bad file is named and the others still import."""
    report = ImportReport([], [])
    for path in paths:
        if zipfile.is_zipfile(path):
            _import_zip(storage, owner_id=owner_id, path=path, report=report)
        else:
            _import_one(storage, owner_id=owner_id, name=path.name, read=path.read_bytes, report=report)
    return report


def file_stem(title: str) -> str:
    """A file name from a title: letters, digits, spaces and dashes only, never empty."""
    return _UNSAFE_NAME.sub("", title).strip()[:60] or "conversation"


def _import_zip(storage: db.Storage, *, owner_id: int, path: Path, report: ImportReport) -> None:
    limit = storage.limits.max_import_bytes
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [e for e in archive.infolist() if not e.is_dir() and e.filename.lower().endswith(".json")]
            if len(entries) > MAX_ZIP_ENTRIES:
                report.refused.append(f"{path.name}: it holds {len(entries)} files; at most {MAX_ZIP_ENTRIES} "
                                      "are imported at once.")
                return
            for entry in entries:
                name = Path(entry.filename).name
                if entry.file_size > limit:
                    report.refused.append(f"{name}: it is larger than the {_megabytes(limit)} import limit.")
                    continue
                _import_one(storage, owner_id=owner_id, name=name,
                            read=lambda e=entry: _read_entry(archive, e, limit), report=report)
    except (zipfile.BadZipFile, OSError, EOFError):
        report.refused.append(f"{path.name}: the zip file is damaged.")


def _read_entry(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, limit: int) -> bytes:
    """The entry's bytes, never more than `limit` whatever its header claims."""
    with archive.open(entry) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise db.LimitExceededError(f"It is larger than the {_megabytes(limit)} import limit.",
                                    limit_name="max_import_bytes", limit=limit, actual=len(data))
    return data


def _import_one(storage: db.Storage, *, owner_id: int, name: str, read, report: ImportReport) -> None:
    try:
        report.imported.append(db.import_json(storage, owner_id=owner_id, data=read()))
    except db.StorageUnavailableError:
        raise
    except db.StorageError as e:
        report.refused.append(f"{name}: {e}")
    except (OSError, zipfile.BadZipFile, EOFError):
        report.refused.append(f"{name}: the file could not be read.")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 10e6 else f"{size / 1e6:.0f} MB"


def _fresh_dir(into: Path) -> Path:
    """A new directory with an unguessable name, so that two exports never share a path."""
    directory = into / secrets.token_hex(8)
    directory.mkdir(parents=True, exist_ok=False)
    return directory
