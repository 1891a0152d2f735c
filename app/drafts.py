"""The photo in the composer before Send, known by the hash storage will give it.

While a question is typed, the engine reads its photo ahead (see `Engine.prefetch`). For Send to
find that work, the draft's photo must carry the key the stored photo will have: the SHA-256 of
the cleaned file, which only cleaning gives. So the upload is cleaned here as `save_upload` will
clean it, without storing anything, and kept for the next keystrokes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from stat import S_ISREG

import storage as db
from mipha_core.images import load_image
from mipha_core.photos import StoredPhoto
from storage.images import prepare_image

KEPT_DRAFT_PHOTOS = 4
"""Composers whose cleaned photo is kept (each at most ``max_image_bytes``)."""


class DraftPhotos:
    """Uploads in composers → their photos as they will be stored, the last ``KEPT_DRAFT_PHOTOS`` kept."""

    def __init__(self, storage: db.Storage, *, kept: int = KEPT_DRAFT_PHOTOS) -> None:
        self.storage = storage
        self.kept = kept
        self._photos: OrderedDict[tuple[int, str, int, int], StoredPhoto] = OrderedDict()
        self._lock = threading.Lock()

    def photo(self, owner_id: int, upload: Path) -> StoredPhoto | None:
        """The upload as it will be stored, decoded only when the engine needs its pixels; None
        when it is gone or not a photo storage would keep (Send then says why)."""
        limit = self.storage.limits.max_image_bytes
        try:
            stat = upload.stat()
        except OSError:
            return None
        if not S_ISREG(stat.st_mode) or stat.st_size > limit:  # a device or pipe reads without end
            return None
        key = (owner_id, str(upload), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if (known := self._photos.get(key)) is not None:
                self._photos.move_to_end(key)
                return known
        try:
            with upload.open("rb") as file:
                prepared = prepare_image(file.read(limit + 1), limits=self.storage.limits)
        except (db.StorageError, OSError):
            return None
        cleaned = prepared.data
        photo = StoredPhoto(key=prepared.sha256, open=lambda: load_image(cleaned))
        with self._lock:
            self._photos[key] = photo
            while len(self._photos) > self.kept:
                self._photos.popitem(last=False)
        return photo
