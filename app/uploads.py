"""Photos from the composer: stored cleaned, and the original upload deleted at once.

Gradio writes each upload to its upload folder as sent, EXIF and GPS included, and would
serve it from there to anyone who has its address. Storage keeps only a re-encoded copy
without metadata, so the original has no reason to stay.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from gradio.utils import get_upload_folder

import storage as db
from app.events import Refused

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


def save_upload(storage: db.Storage, path: Path) -> db.ImageRecord:
    """Store the cleaned photo; the original upload (with its EXIF and GPS) is deleted.

    Every refusal is an `app.events.Refused` for the composer; a failing disk or database is
    raised as is (storage's own sentence), and then the upload stays so that sending again works.
    """
    limit = storage.limits.max_image_bytes
    try:
        size = path.stat().st_size
    except OSError as e:
        raise Refused("The upload did not arrive completely; add the photo again.") from e
    if size > limit:
        discard_upload(path)
        raise Refused(f"The photo is {size / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB. "
                      "Use a smaller or more compressed photo.")
    try:
        record = db.save_image(storage, path.read_bytes())
    except db.InvalidImageError as e:
        discard_upload(path)
        raise Refused("That file is not a photo this app can read: send a JPEG, PNG, WebP, GIF, BMP, HEIC "
                      "or AVIF photo.") from e
    except db.LimitExceededError as e:
        discard_upload(path)
        raise Refused(str(e)) from e
    except OSError as e:
        raise Refused("The upload did not arrive completely; add the photo again.") from e
    discard_upload(path)
    return record
