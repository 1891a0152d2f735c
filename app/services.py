"""What the handlers need, built once by `launch.py` (or a test) and passed to `build_app`."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.model_slot import ModelSlot
from app.replies import ReplyJobs
from app.settings import Settings
from storage import Storage

REPLY_GRACE_S = 120.0
"""How long a reply goes on with nobody listening (a reload, a dropped connection) before it stops."""


@dataclass
class Services:
    """The settings, the open storage, the model slot and the replies being written."""

    settings: Settings
    storage: Storage
    model: ModelSlot
    replies: ReplyJobs = field(default=None)  # type: ignore[assignment]  # built from settings below

    def __post_init__(self) -> None:
        if self.replies is None:
            self.replies = ReplyJobs(max_running=self.settings.concurrency, grace_s=REPLY_GRACE_S)
