"""Images: cleaned, content-addressed, written once.

An upload is decoded with Pillow, turned upright (EXIF orientation applied),
and re-encoded *without* any metadata: EXIF (GPS position, camera serial,
time), XMP, ICC profiles and comments are dropped. Only the cleaned bytes are
kept; the original upload never touches the disk. The file is named by the
SHA-256 of the cleaned bytes, so the same photo is stored once however many
messages use it. A photo from an import that is already such a clean file is
kept byte for byte (:func:`prepare_imported_image`), so an export imported
back keeps its pixels and its name.

Layout: ``<data_dir>/images/<sha[:2]>/<sha>.<jpg|png>``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.config import StorageLimits
from storage.errors import ImageNotFoundError, InvalidImageError, LimitExceededError
from storage.failures import file_failures
from storage.image_markers import is_clean_jpeg, is_clean_png
from storage.mapping import image_record
from storage.models import Image, Message
from storage.records import ImageRecord

if TYPE_CHECKING:
    from storage.db import Storage

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
# Formats we decode. A short list on purpose: each decoder is attack surface.
# HEIF comes from pillow-heif; AVIF only where this Pillow build has it.
_ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "HEIF", "AVIF")
# Sources that were lossy stay JPEG; everything else becomes lossless PNG.
# (The JPEG opener reports multi-picture phone photos as "MPO".)
_LOSSY_SOURCES = {"JPEG", "MPO", "HEIF", "AVIF"}
JPEG_QUALITY = 92
# Pixel modes of the files _encode_clean writes.
_JPEG_MODES = ("RGB",)
_PNG_MODES = ("1", "L", "LA", "RGB", "RGBA", "P")


@dataclass(frozen=True)
class PreparedImage:
    """Cleaned image bytes, ready to store."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int

    @classmethod
    def of(cls, data: bytes, *, format: str, size: tuple[int, int]) -> PreparedImage:
        """The record of `data`, named by its SHA-256."""
        return cls(data=data, sha256=hashlib.sha256(data).hexdigest(), format=format, width=size[0], height=size[1])


@functools.cache
def _decoders() -> tuple[str, ...]:
    """Register the HEIF opener once and return the accepted formats Pillow can open."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    PILImage.init()
    return tuple(name for name in _ACCEPTED_FORMATS if name in PILImage.OPEN)


def prepare_image(data: bytes, *, limits: StorageLimits) -> PreparedImage:
    """Validate, orient and strip an uploaded image. Pure: touches no file."""
    image, source_format = _decode(data, limits=limits)
    return _encode_clean(image, source_format=source_format)


def prepare_imported_image(data: bytes, *, limits: StorageLimits) -> PreparedImage:
    """Validate an image from an export; keep its bytes if they are already clean.

    A JPEG re-encoded a second time loses detail and gets a new SHA-256, so an
    import would neither match the photo it came from nor find it already
    stored. A file that is fully decoded and holds nothing but image data (what
    :func:`prepare_image` writes) is therefore kept as is; any other file is
    cleaned like an upload.
    """
    image, source_format = _decode(data, limits=limits)
    if not _is_clean_file(data, source_format=source_format, mode=image.mode):
        return _encode_clean(image, source_format=source_format)
    return PreparedImage.of(data, format=source_format, size=image.size)


def _is_clean_file(data: bytes, *, source_format: str, mode: str) -> bool:
    if source_format == "JPEG":
        return mode in _JPEG_MODES and is_clean_jpeg(data)
    if source_format == "PNG":
        return mode in _PNG_MODES and is_clean_png(data)
    return False


def _decode(data: bytes, *, limits: StorageLimits) -> tuple[PILImage.Image, str]:
    """Fully decode (under the pixel limit) and turn upright; returns the image and its format."""
    if len(data) > limits.max_image_bytes:
        raise LimitExceededError(
            f"The photo is {len(data) / 1e6:.1f} MB; the limit is "
            f"{limits.max_image_bytes / 1e6:.1f} MB. Use a smaller or more compressed photo.",
            limit_name="max_image_bytes",
            limit=limits.max_image_bytes,
            actual=len(data),
        )
    formats = _decoders()
    try:
        with warnings.catch_warnings():
            # Our own pixel limit (below, before decoding) is the one that matters.
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data), formats=formats) as source:
                _check_pixels(source.size, limits=limits)
                source_format = source.format or ""
                image = ImageOps.exif_transpose(source)  # decodes; returns a new image
    except PILImage.DecompressionBombError as e:
        raise LimitExceededError(
            "The photo has far too many pixels to open safely. Use a smaller photo.",
            limit_name="max_image_pixels",
            limit=limits.max_image_pixels,
            actual=0,
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated or corrupt files as OSError/SyntaxError/ValueError.
        raise InvalidImageError(
            "This file could not be read as a photo (JPEG, PNG, WebP, GIF, BMP, HEIC or AVIF). "
            "Try exporting it again as JPEG or PNG."
        ) from e
    return image, source_format


def _check_pixels(size: tuple[int, int], *, limits: StorageLimits) -> None:
    width, height = size
    if width * height > limits.max_image_pixels:
        raise LimitExceededError(
            f"The photo is {width}x{height} pixels ({width * height / 1e6:.0f} MP); the limit is "
            f"{limits.max_image_pixels / 1e6:.0f} MP. Resize it and try again.",
            limit_name="max_image_pixels",
            limit=limits.max_image_pixels,
            actual=width * height,
        )


def _encode_clean(image: PILImage.Image, *, source_format: str) -> PreparedImage:
    # Privacy: start from pixels only. info carries exif/xmp/icc/comments that
    # some encoders would otherwise copy into the output.
    image.info = {}
    if source_format in _LOSSY_SOURCES:
        out_format = "JPEG"
        image = image.convert("RGB")
        options = {"quality": JPEG_QUALITY, "optimize": True}
    else:
        out_format = "PNG"
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        options = {"optimize": False}
    buffer = io.BytesIO()
    image.save(buffer, format=out_format, **options)
    return PreparedImage.of(buffer.getvalue(), format=out_format, size=image.size)


def save_image(storage: Storage, data: bytes) -> ImageRecord:
    """Clean and store an uploaded image; returns its record (existing one if a duplicate).

    A failure to write the file or the row raises a StorageUnavailableError subclass.
    """
    prepared = prepare_image(data, limits=storage.limits)
    write_image_file(storage.images_dir, prepared)
    with storage.session() as session:
        return store_image_row(session, prepared)


def store_image_row(session: Session, prepared: PreparedImage) -> ImageRecord:
    """Insert the image's row unless it exists (the file must already be written)."""
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
    return image_record(row)


def get_image(session: Session, *, sha256: str) -> ImageRecord:
    row = session.get(Image, sha256) if _SHA256.fullmatch(str(sha256)) else None
    if row is None:
        raise ImageNotFoundError(str(sha256))
    return image_record(row)


def image_path(storage: Storage, sha256: str) -> Path:
    """Where the stored image lives; raises ImageNotFoundError if it is not there."""
    # The name is validated as 64 hex digits before it becomes part of a path.
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ImageNotFoundError(str(sha256)[:64])
    for extension in _EXTENSIONS.values():
        path = _path_for(storage.images_dir, sha256, extension)
        if path.is_file():
            return path
    raise ImageNotFoundError(sha256)


def _path_for(images_dir: Path, sha256: str, extension: str) -> Path:
    return images_dir / sha256[:2] / f"{sha256}.{extension}"


def write_image_file(images_dir: Path, prepared: PreparedImage) -> bool:
    """Write the file once, atomically (temp file, fsync, rename). True if newly written.

    Raises a StorageUnavailableError subclass if the disk refuses (full, read-only).
    """
    path = _path_for(images_dir, prepared.sha256, _EXTENSIONS[prepared.format])
    if path.is_file():
        return False
    with file_failures(f"writing the photo file {path}"):
        _write_atomically(path, prepared.data)
    return True


def _write_atomically(path: Path, data: bytes) -> None:
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
    """Delete the rows of ``candidates`` no message uses any more.

    Call after deleting messages, in the same transaction. The files are
    removed by ``Storage.session()`` once the transaction has committed.
    """
    from storage.db import RELEASED_IMAGES_KEY

    candidates = set(candidates)
    if not candidates:
        return set()
    still_used = set(
        session.scalars(select(Message.image_sha256).where(Message.image_sha256.in_(candidates)))
    )
    released = candidates - still_used
    for sha256 in released:
        row = session.get(Image, sha256)
        if row is not None:
            session.delete(row)
    session.flush()
    session.info.setdefault(RELEASED_IMAGES_KEY, set()).update(released)
    return released


def remove_image_files(images_dir: Path, sha256s: Iterable[str]) -> None:
    """Remove released files; a failure is only logged.

    This runs after the commit that deleted the rows, so there is nothing to
    roll back: the next start-up's sweep removes whatever file is left.
    """
    for sha256 in sha256s:
        for extension in _EXTENSIONS.values():
            _unlink_or_log(_path_for(images_dir, sha256, extension))
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
    release whose files were not yet removed). Returns the number of files removed.
    """
    with storage.session() as session:
        unused = session.scalars(
            select(Image.sha256).where(~select(Message.id).where(Message.image_sha256 == Image.sha256).exists())
        ).all()
        release_unused_images(session, candidates=unused)
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
