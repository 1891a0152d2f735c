"""What a handler wants the page to show: one typed value, mapped to components in `app.ui.page`.

Every field defaults to `KEEP` (leave that part of the page as it is), so a handler names only
what it changes. No gradio here: handlers stay testable as plain functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, TypeVar

from mipha_core import GenerationParams


class _Keep(Enum):
    KEEP = "keep"

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep.KEEP
T = TypeVar("T")
Maybe = T | Literal[_Keep.KEEP]


@dataclass(frozen=True)
class Notice:
    """A sentence by the composer: a refusal that kept the person's text, or a note on the reply."""

    text: str
    kind: Literal["error", "warning", "info"] = "error"


NO_NOTICE: Final = Notice("", "info")


@dataclass(frozen=True)
class ConversationList:
    """The sidebar list: (label, id) choices, newest first, and the one that is open."""

    choices: list[tuple[str, str]]
    selected: str | None


@dataclass(frozen=True)
class ShareState:
    """The open conversation's read-only link (a path on this server); None when it has none or it is off."""

    path: str | None


@dataclass(frozen=True)
class Editing:
    """The question being edited: Send makes a new version of it instead of a new question."""

    message_id: int
    label: str


@dataclass(frozen=True)
class PageView:
    """The parts of the page a handler changes; `KEEP` leaves a part as it is."""

    conversation_id: Maybe[str | None] = KEEP
    """The open conversation (None: a new chat); also the page's address."""
    messages: Maybe[list[dict]] = KEEP
    title: Maybe[str] = KEEP
    params: Maybe[GenerationParams] = KEEP
    conversations: Maybe[ConversationList] = KEEP
    notice: Maybe[Notice] = KEEP
    composer: Maybe[Literal["clear"] | str] = KEEP
    """"clear" empties the box (text and photo); a string puts that text in it."""
    editing: Maybe[Editing | None] = KEEP
    busy: Maybe[bool] = KEEP
    """A reply is being written: Send waits, Stop works."""
    context: Maybe[str] = KEEP
    """The context meter's HTML (see `app.context_meter`)."""
    share: Maybe[ShareState] = KEEP
    download: Maybe[str | None] = KEEP
    """A file to offer for download (an export), or None to hide the last one."""

    def merged(self, later: PageView) -> PageView:
        """This view with every part `later` sets taken from `later`."""
        fields = {name: value for name, value in vars(later).items() if value is not KEEP}
        return PageView(**{**vars(self), **fields})
