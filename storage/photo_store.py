"""Where stored photos live: files under the data directory, or bytes in a shared database.

A photo is named by the SHA-256 of its cleaned bytes (see :mod:`storage.images`)
and has a row in ``images``. Its bytes live in one of two places:

- **SQLite** (one server per data directory): the file
  ``<data_dir>/images/<sha[:2]>/<sha>.<jpg|png>`` is the photo.
- **A shared database** (PostgreSQL; :attr:`StorageConfig.is_shared`): the bytes
  are in ``image_blobs``, written in the same transaction as the ``images`` row,
  so every replica can serve every photo. Each replica's ``images/`` folder is
  then a cache, filled on demand by :func:`image_path`. Whether a photo exists is
  always the database's answer: a photo deleted on one replica is never served
  from another's stale cache (its cached file is removed when asked for, or at
  that replica's next start).

Either way :func:`image_path` returns a local file that can be read, and a
photo no message uses any more is deleted (rows, bytes and this server's file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.errors import ImageNotFoundError
from storage.failures import file_failures
from storage.mapping import image_record
from storage.models import Image, ImageBlob, Message
from storage.records import ImageRecord
from storage.replicas import database_now

if TYPE_CHECKING:
    from storage.db import Storage
    from storage.images import PreparedImage

logger = logging.getLogger(__name__)

SHA256 = re.compile(r"[0-9a-f]{64}")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}


def store_image_row(session: Session, prepared: PreparedImage, *, keep_bytes: bool = False) -> ImageRecord:
    """Insert the image's row unless it exists; with ``keep_bytes``, its bytes too.

    Without ``keep_bytes`` (SQLite) the file must already be written. Each insert
    runs in a savepoint, so losing a race with another writer of the same photo
    keeps the caller's transaction.
    """
    row = session.get(Image, prepared.sha256)
    if row is None:
        try:
            with session.begin_nested():
                row = Image(
                    sha256=prepared.sha256,
                    format=prepared.format,
                    width=prepared.width,
                    height=prepared.height,
                    size_bytes=len(prepared.data),
                )
                session.add(row)
        except IntegrityError:
            row = session.get(Image, prepared.sha256)
    if keep_bytes and not _has_bytes(session, prepared.sha256):
        try:
            with session.begin_nested():
                session.add(ImageBlob(sha256=prepared.sha256, data=prepared.data))
        except IntegrityError:
            pass  # another writer stored the same bytes (same SHA-256) first
    return image_record(row)


def image_path(storage: Storage, sha256: str, *, session: Session | None = None) -> Path:
    """A local file holding the stored photo; raises ImageNotFoundError if it is not stored.

    On a shared database the database says whether the photo exists, and the
    file is this server's cached copy, written from the database when missing.
    ``session``: the caller's, if it has one open (else a short one is used).
    """
    # The name is validated as 64 hex digits before it becomes part of a path.
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        raise ImageNotFoundError(str(sha256)[:64])
    if not storage.photos_in_database:
        for extension in EXTENSIONS.values():
            path = path_for(storage.images_dir, sha256, extension)
            if path.is_file():
                return path
        raise ImageNotFoundError(sha256)
    with _session(storage, session) as s:
        image_format = s.scalar(select(Image.format).where(Image.sha256 == sha256))
        if image_format is None:
            remove_image_files(storage.images_dir, [sha256])  # deleted elsewhere: drop our stale copy
            raise ImageNotFoundError(sha256)
        path = path_for(storage.images_dir, sha256, EXTENSIONS[image_format])
        if not path.is_file():
            _cache(path, sha256=sha256, data=s.scalar(select(ImageBlob.data).where(ImageBlob.sha256 == sha256)))
    return path


def cache_all_photos(storage: Storage) -> int:
    """Write every photo of a shared database into this server's images directory; returns how many.

    For taking the photos along before downgrading below revision 0004, or
    before moving to SQLite (which reads photos from files only).
    """
    with storage.session() as session:
        stored = session.scalars(select(Image.sha256)).all()
    for sha256 in stored:
        image_path(storage, sha256)
    return len(stored)


def _cache(path: Path, *, sha256: str, data: bytes | None) -> None:
    if data is None:  # a row without bytes: stored by a server before 0004 that no replica has adopted
        logger.warning("photo %s has no stored bytes on this database", sha256)
        raise ImageNotFoundError(sha256)
    if hashlib.sha256(data).hexdigest() != sha256:
        logger.error("the stored bytes of photo %s do not match its SHA-256; not serving them", sha256)
        raise ImageNotFoundError(sha256)
    with file_failures(f"caching the photo file {path}"):
        write_atomically(path, data)


def path_for(images_dir: Path, sha256: str, extension: str) -> Path:
    return images_dir / sha256[:2] / f"{sha256}.{extension}"


def write_image_file(images_dir: Path, prepared: PreparedImage) -> bool:
    """Write the file once, atomically (temp file, fsync, rename). True if newly written.

    Raises a StorageUnavailableError subclass if the disk refuses (full, read-only).
    """
    path = path_for(images_dir, prepared.sha256, EXTENSIONS[prepared.format])
    if path.is_file():
        return False
    with file_failures(f"writing the photo file {path}"):
        write_atomically(path, prepared.data)
    return True


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)  # atomic: readers see no file or the whole file
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def release_unused_images(session: Session, *, candidates: Iterable[str]) -> set[str]:
    """Delete the rows (and stored bytes) of ``candidates`` no message uses any more.

    Call after deleting messages, in the same transaction. The files are
    removed by ``Storage.session()`` once the transaction has committed.
    """
    from storage.db import RELEASED_IMAGES_KEY

    candidates = set(candidates)
    if not candidates:
        return set()
    # Lock the rows first (in one order, so two releasers never wait in a circle): a
    # message being attached in another transaction holds its photo's row (see
    # storage.messages), so it is either seen below as a use or finds the photo gone.
    session.execute(
        select(Image.sha256).where(Image.sha256.in_(candidates)).order_by(Image.sha256).with_for_update()
    )
    still_used = set(
        session.scalars(select(Message.image_sha256).where(Message.image_sha256.in_(candidates)))
    )
    released = candidates - still_used
    if released:
        session.execute(delete(ImageBlob).where(ImageBlob.sha256.in_(released)))
        session.execute(delete(Image).where(Image.sha256.in_(released)))  # rows another replica deleted: no error
    session.info.setdefault(RELEASED_IMAGES_KEY, set()).update(released)
    return released


def remove_image_files(images_dir: Path, sha256s: Iterable[str]) -> None:
    """Remove released files; a failure is only logged.

    This runs after the commit that deleted the rows, so there is nothing to
    roll back: the next start-up's sweep removes whatever file is left.
    """
    for sha256 in sha256s:
        for extension in EXTENSIONS.values():
            _unlink_or_log(path_for(images_dir, sha256, extension))
    logger.debug("released image files")


def _unlink_or_log(path: Path) -> bool:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("could not remove the image file %s, left for the next start-up: %s", path, e)
        return False
    return True


def sweep_images(storage: Storage) -> int:
    """Start-up clean-up: drop unused image rows, files without rows and stale temp files.

    Catches what a crash left behind (an upload never attached to a message, a
    release whose files were not yet removed) and, on a shared database, what
    other replicas deleted while this one was down. There, a photo no message
    uses yet may be another replica's upload about to be sent, so only those
    older than ``unattached_photo_grace_s`` go; and the photos of an earlier
    single-server PostgreSQL data directory (rows without bytes) are adopted
    from this directory's files. Returns the number of files removed.
    """
    with storage.session() as session:
        unused = select(Image.sha256).where(~select(Message.id).where(Message.image_sha256 == Image.sha256).exists())
        if storage.config.is_shared:
            grace = timedelta(seconds=storage.config.unattached_photo_grace_s)
            unused = unused.where(Image.created_at < database_now(session) - grace)
        release_unused_images(session, candidates=session.scalars(unused).all())
        if storage.photos_in_database:
            _adopt_files(session, storage.images_dir)
        known = set(session.scalars(select(Image.sha256)))
    removed = 0
    if not storage.images_dir.is_dir():
        return removed
    for path in storage.images_dir.glob("*/*"):
        if (path.name.startswith(".tmp-") or path.stem not in known) and _unlink_or_log(path):
            removed += 1
    if removed:
        logger.info("removed %d stray image files", removed)
    return removed


def _adopt_files(session: Session, images_dir: Path) -> None:
    """Store the bytes of photos that have a row but no bytes from this directory's files."""
    without_bytes = session.execute(
        select(Image.sha256, Image.format).where(~select(ImageBlob.sha256).where(ImageBlob.sha256 == Image.sha256)
                                                 .exists())
    ).all()
    adopted = 0
    for sha256, image_format in without_bytes:
        path = path_for(images_dir, sha256, EXTENSIONS.get(image_format, "jpg"))
        try:
            data = path.read_bytes()
        except OSError:
            continue  # another replica may have it; image_path says "not found" until one adopts it
        if hashlib.sha256(data).hexdigest() != sha256:
            continue
        try:
            with session.begin_nested():  # another replica starting now may adopt it too
                session.add(ImageBlob(sha256=sha256, data=data))
            adopted += 1
        except IntegrityError:
            continue
    if adopted:
        logger.info("stored the bytes of %d photos from %s in the database", adopted, images_dir)


def _has_bytes(session: Session, sha256: str) -> bool:
    return session.scalar(select(ImageBlob.sha256).where(ImageBlob.sha256 == sha256)) is not None


@contextmanager
def _session(storage: Storage, session: Session | None) -> Iterator[Session]:
    if session is not None:
        yield session
        return
    with storage.session() as own:
        yield own
