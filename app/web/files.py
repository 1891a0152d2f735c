"""Gradio's temporary files: one directory per data dir, emptied at start, swept while running.

Gradio writes uploads and copies of every file it shows (photos included) under
`GRADIO_TEMP_DIR` and serves them at `/gradio_api/file=<path>`. Pointing that at a
directory the app owns and empties means nothing from an earlier run, or from another app
on the machine, is ever served, and nothing lingers: files older than the age limit go.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import storage as db
from storage import Storage

log = logging.getLogger(__name__)

_STORED_PHOTO = re.compile(r"(?P<sha256>[0-9a-f]{64})\.(jpg|png)")
"""How storage names photos; Gradio's cached copy keeps the name."""


def prepare_temp_dir(temp_dir: Path) -> Path:
    """Empty (or create) `temp_dir` and make Gradio use it; call before gradio is imported.

    Gradio reads `GRADIO_TEMP_DIR` at import and whenever it builds a component, so the
    environment variable is its only complete setting.
    """
    temp_dir = temp_dir.resolve()
    if temp_dir.exists():
        shutil.rmtree(temp_dir)
    temp_dir.mkdir(parents=True, mode=0o700)
    os.environ["GRADIO_TEMP_DIR"] = str(temp_dir)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(temp_dir / "examples")
    log.info("temporary files (uploads, cached copies) go to %s", temp_dir)
    return temp_dir


def sweep(temp_dir: Path, *, max_age_s: float, keep: Iterable[Path] = (), now: float | None = None) -> int:
    """Delete files older than `max_age_s` (and directories left empty); returns how many files."""
    cutoff = (time.time() if now is None else now) - max_age_s
    kept = set(keep)
    emptied: set[Path] = set()
    removed = 0
    for path in sorted(temp_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # deepest first
        try:
            old = path.lstat().st_mtime < cutoff
            if path.is_dir() and not path.is_symlink():
                if (old or path in emptied) and _remove_if_empty(path):
                    emptied.add(path.parent)
            elif old and path not in kept:
                path.unlink()
                emptied.add(path.parent)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _remove_if_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:  # not empty
        return False
    return True


def files_in(temp_dir: Path) -> frozenset[Path]:
    """The files now in `temp_dir` (those Gradio made while building the page are kept)."""
    return frozenset(p for p in temp_dir.rglob("*") if p.is_file())


def file_refusal_reason(requested: str, *, data_dir: Path, temp_dir: Path,
                        photo_exists: Callable[[str], bool]) -> str | None:
    """Why `/gradio_api/file=<requested>` must not be served, or None.

    Nothing under the data dir is served except Gradio's temporary files (the database,
    the browser key and the photos themselves are reached only through copies), and a copy
    of a photo whose conversation was deleted is removed instead of served.
    """
    try:
        path = Path(os.path.abspath(requested))  # what Gradio serves, `..` resolved
        real = path.resolve()
    except (OSError, ValueError):  # a NUL byte, a symlink loop, a name too long
        return "unreadable path"
    if _inside(real, data_dir) and not _inside(real, temp_dir):
        return "data"
    match = _STORED_PHOTO.fullmatch(path.name)
    if match and _inside(real, temp_dir) and not photo_exists(match["sha256"]):
        real.unlink(missing_ok=True)
        return "deleted photo"
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def stored_photo_lookup(storage: Storage) -> Callable[[str], bool]:
    """`photo_exists` for the guard: whether storage still holds the photo with this SHA-256."""

    def photo_exists(sha256: str) -> bool:
        try:
            db.image_path(storage, sha256)
        except db.ImageNotFoundError:
            return False
        return True

    return photo_exists
