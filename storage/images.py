"""Images: cleaned, content-addressed, written once.

An upload is decoded with Pillow, turned upright (EXIF orientation applied),
and re-encoded *without* any metadata: EXIF (GPS position, camera serial,
time), XMP, ICC profiles and comments are dropped. Only the cleaned bytes are
kept; the original upload never touches the disk. The file is named by the
SHA-256 of the cleaned bytes, so the same photo is stored once however many
messages use it. A photo from an import that is already such a clean file is
kept byte for byte (:func:`prepare_imported_image`), so an export imported
back keeps its pixels and its name.

Where the stored bytes live (files, or the database when replicas share it)
is :mod:`storage.photo_store`'s business.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError
from sqlalchemy.orm import Session

from mipha_core.images import to_rgb
from storage.config import StorageLimits
from storage.errors import ImageNotFoundError, InvalidImageError, LimitExceededError
from storage.image_markers import is_clean_jpeg, is_clean_png
from storage.mapping import image_record
from storage.models import Image
from storage.photo_store import SHA256, store_image_row, write_image_file
from storage.records import ImageRecord

if TYPE_CHECKING:
    from storage.db import Storage

logger = logging.getLogger(__name__)

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
        image = to_rgb(image)
        options = {"quality": JPEG_QUALITY, "optimize": True}
    else:
        out_format = "PNG"
        if image.mode not in _PNG_MODES:  # 16-bit and float photos are scaled to 8 bits, not clipped to white
            image = image.convert("RGBA") if "A" in image.getbands() else to_rgb(image)
        options = {"optimize": False}
    buffer = io.BytesIO()
    image.save(buffer, format=out_format, **options)
    return PreparedImage.of(buffer.getvalue(), format=out_format, size=image.size)


def save_image(storage: Storage, data: bytes) -> ImageRecord:
    """Clean and store an uploaded image; returns its record (existing one if a duplicate).

    On a shared database the bytes go into the database with the row, in one
    transaction (the file is then this server's cached copy). A failure to
    write the file or the row raises a StorageUnavailableError subclass.
    """
    prepared = prepare_image(data, limits=storage.limits)
    write_image_file(storage.images_dir, prepared)
    with storage.session() as session:
        return store_image_row(session, prepared, keep_bytes=storage.photos_in_database)


def get_image(session: Session, *, sha256: str) -> ImageRecord:
    row = session.get(Image, sha256) if SHA256.fullmatch(str(sha256)) else None
    if row is None:
        raise ImageNotFoundError(str(sha256))
    return image_record(row)
