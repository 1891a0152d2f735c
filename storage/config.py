"""Storage settings: where data lives and the limits enforced on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class StorageLimits:
    """Limits enforced by storage itself, whatever the UI already checks.

    Defaults suit one person's local app; a public Space may want them lower.
    """

    max_image_bytes: int = 20 * MIB
    """Size of an uploaded (or imported) image file before processing."""
    max_image_pixels: int = 40_000_000
    """width x height; refused before decoding, so a decompression bomb never expands."""
    max_message_chars: int = 20_000
    """Length of one message, question or reply."""
    max_messages_per_conversation: int = 1_000
    max_conversations_per_user: int = 1_000
    max_title_chars: int = 80
    max_settings_bytes: int = 4_096
    """Size of a conversation's generation settings as JSON."""
    max_import_bytes: int = 200 * MIB
    """Size of a JSON export accepted by ``import_json`` (images are inline)."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"StorageLimits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class StorageConfig:
    """Where storage keeps its data.

    ``data_dir`` holds the SQLite database (``mipha.sqlite3``) and the images
    (``images/``). ``database_url`` overrides the database location, e.g. a
    PostgreSQL URL; images still live under ``data_dir``.
    """

    data_dir: Path
    database_url: str | None = None
    limits: StorageLimits = field(default_factory=StorageLimits)
    busy_timeout_ms: int = 15_000

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'mipha.sqlite3').resolve()}"
