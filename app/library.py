"""Conversations as links and files: share read-only, turn the link off, export, import.

The sidebar's *This conversation* and *All conversations* sections; each method takes the owner
(from the request) first and returns a `PageView`, like `app.handlers.Handlers`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import storage as db
from app.events import Refused
from app.page_view import NO_NOTICE, Notice, PageView, ShareState
from app.services import Services
from app.transfer import ExportFormat, export_all, export_conversation, import_files
from app.uploads import discard_upload


class Library:
    """Sharing, export and import for one app; `open` shows a conversation (`Handlers.open`)."""

    def __init__(self, services: Services, *, open: Callable[[int | None, str | None], PageView]) -> None:
        self.storage = services.storage
        self.settings = services.settings
        self._open = open

    def share(self, owner_id: int | None, conversation_id: str | None) -> PageView:
        owner_id, conversation_id = opened(owner_id, conversation_id, "share it")
        with self.storage.session() as s:
            share = db.share_conversation(s, owner_id=owner_id, conversation_id=conversation_id)
        return PageView(share=share_state(share), notice=Notice(
            "Anyone with this link can read this conversation (not change it) until you turn the link off.",
            "info"))

    def unshare(self, owner_id: int | None, conversation_id: str | None) -> PageView:
        owner_id, conversation_id = opened(owner_id, conversation_id, "turn its link off")
        with self.storage.session() as s:
            db.revoke_share(s, owner_id=owner_id, conversation_id=conversation_id)
        return PageView(share=ShareState(None), notice=Notice("The link is off: it no longer shows this "
                                                              "conversation.", "info"))

    def export(self, owner_id: int | None, conversation_id: str | None, format: ExportFormat) -> PageView:
        owner_id, conversation_id = opened(owner_id, conversation_id, "export it")
        path = export_conversation(self.storage, owner_id=owner_id, conversation_id=conversation_id,
                                   format=format, into=self._exports_dir)
        return PageView(download=str(path), notice=NO_NOTICE)

    def export_everything(self, owner_id: int | None) -> PageView:
        if owner_id is None:
            raise Refused("The page is still starting; try again in a second.", kind="warning")
        path = export_all(self.storage, owner_id=owner_id, into=self._exports_dir)
        if path is None:
            raise Refused("There is nothing to export yet.", kind="info")
        return PageView(download=str(path), notice=NO_NOTICE)

    def import_(self, owner_id: int | None, files: list[Any] | None) -> PageView:
        """Exported conversations back in; the last one imported opens."""
        if owner_id is None:
            raise Refused("The page is still starting; try again in a second.", kind="warning")
        paths = [Path(f if isinstance(f, str) else getattr(f, "name", "")) for f in files or []]
        try:
            report = import_files(self.storage, owner_id=owner_id, paths=[p for p in paths if p.name])
        finally:
            for path in paths:
                discard_upload(path)
        if not report.imported:
            raise Refused(" ".join(report.refused) or "Choose a file exported from Mipha Chat (.json or .zip).")
        count = len(report.imported)
        said = f"Imported {count} conversation{'s' if count != 1 else ''}."
        if report.refused:
            said += " Not imported: " + " ".join(report.refused)
        view = self._open(owner_id, report.imported[-1].id)
        return view.merged(PageView(notice=Notice(said, "warning" if report.refused else "info")))

    @property
    def _exports_dir(self) -> Path:
        return self.settings.temp_dir / "exports"


def opened(owner_id: int | None, conversation_id: str | None, doing: str) -> tuple[int, str]:
    """The owner and the open conversation, or a notice to open one first."""
    if not conversation_id or owner_id is None:
        raise Refused(f"Open a conversation first, then {doing}.", kind="warning")
    return owner_id, conversation_id


def share_state(share: db.ShareRecord | None) -> ShareState:
    """The link as the sidebar shows it: a path on this server, or None."""
    return ShareState(None if share is None else f"/share/{share.token}")
