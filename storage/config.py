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
    PostgreSQL URL (``postgresql+psycopg://user:password@host/db``). Any database
    other than SQLite is *shared*: several servers (replicas), each with its own
    data directory, may use it at once. Photo bytes then live in the database and
    ``images/`` is this server's cache of them; see :attr:`is_shared`.
    """

    data_dir: Path
    database_url: str | None = None
    limits: StorageLimits = field(default_factory=StorageLimits)
    busy_timeout_ms: int = 15_000
    """How long a write waits for a lock (SQLite's busy timeout, PostgreSQL's lock_timeout)."""
    heartbeat_interval_s: float = 10.0
    """Shared database: how often this replica says it is alive (and sweeps up after gone ones)."""
    replica_timeout_s: float = 60.0
    """Shared database: a replica silent this long is gone; its unfinished replies become interrupted."""
    unattached_photo_grace_s: float = 3600.0
    """Shared database: a photo no message uses is removed at start-up only once it is this old
    (another replica may be about to attach it)."""

    def __post_init__(self) -> None:
        for name in ("busy_timeout_ms", "heartbeat_interval_s", "replica_timeout_s", "unattached_photo_grace_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"StorageConfig.{name} must be a positive number, got {value!r}")
        if self.replica_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"StorageConfig.replica_timeout_s ({self.replica_timeout_s}) must be more than twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}), or live replicas would look gone"
            )

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'mipha.sqlite3').resolve()}"

    @property
    def is_shared(self) -> bool:
        """True for a database other than SQLite: replicas may share it, photos live in it.

        SQLite keeps the one-writer rule instead: one server per data directory
        (and so per database), photos as files under the data directory.
        """
        return not self.resolved_database_url.startswith("sqlite")
