"""What the handlers need, built once by `launch.py` (or a test) and passed to `build_app`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from app.model_slot import ModelSlot
from app.settings import Settings
from storage import Storage


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
    cancels: CancelRegistry = field(default_factory=CancelRegistry)
