"""Original uploads: deleted as soon as the cleaned photo is stored.

Gradio writes each upload to its upload folder as sent, EXIF and GPS included, and would
serve it from there to anyone who has its address. Storage keeps only a re-encoded copy
without metadata, so the original has no reason to stay.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from gradio.utils import get_upload_folder

log = logging.getLogger(__name__)


def discard_upload(path: Path) -> bool:
    """Delete `path` if it lies inside Gradio's upload folder; True if it was deleted.

    The path comes from the client's message, so anything outside that folder (an example
    photo from assets/, a forged path) is left alone.
    """
    folder = Path(get_upload_folder()).resolve()
    try:
        resolved = path.resolve(strict=True)
    except OSError:
        return False
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        return False
    resolved.unlink(missing_ok=True)
    _remove_if_empty(resolved.parent, stop_at=folder)
    log.debug("deleted the original upload %s", resolved.name)
    return True


def _remove_if_empty(directory: Path, *, stop_at: Path) -> None:
    """Gradio puts each upload in a folder of its own; remove it once empty."""
    if directory != stop_at and directory.is_relative_to(stop_at):
        with contextlib.suppress(OSError):  # not empty: another file still lives there
            directory.rmdir()
