"""What the handlers need, built once by `launch.py` (or a test) and passed to `build_app`."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from app.model_slot import ModelSlot
from app.settings import Settings
from storage import Storage

log = logging.getLogger(__name__)

BROWSER_KEY_FILE = "browser-state.key"


class CancelRegistry:
    """One cancel `Event` per (owner, conversation) reply in flight, so Stop reaches the right one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[tuple[int, str], threading.Event] = {}

    def new(self, owner_id: int, conversation_id: str) -> threading.Event:
        """A fresh event for the next reply of this conversation (replacing a finished one)."""
        event = threading.Event()
        with self._lock:
            self._events[(owner_id, conversation_id)] = event
        return event

    def get(self, owner_id: int, conversation_id: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault((owner_id, conversation_id), threading.Event())

    def cancel(self, owner_id: int, conversation_id: str) -> bool:
        """Set the event of this conversation's reply; False when none is registered."""
        with self._lock:
            event = self._events.get((owner_id, conversation_id))
        if event is None:
            return False
        event.set()
        return True

    def release(self, owner_id: int, conversation_id: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get((owner_id, conversation_id)) is event:
                del self._events[(owner_id, conversation_id)]


@dataclass
class Services:
    """The settings, the open storage, the model slot and the per-reply cancel events."""

    settings: Settings
    storage: Storage
    model: ModelSlot
    browser_state_key: str
    """Encrypts the identity secret `gr.BrowserState` keeps; stable across restarts."""
    cancels: CancelRegistry = field(default_factory=CancelRegistry)


def browser_state_key(data_dir: Path) -> str:
    """The key in `data_dir`, created on first start (owner-only permissions).

    `gr.BrowserState` otherwise draws a new key per process, and every browser would lose its
    identity, and so its conversations, at each restart.
    """
    path = data_dir / BROWSER_KEY_FILE
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key)
    log.info("created the browser identity key %s", path)
    return key
