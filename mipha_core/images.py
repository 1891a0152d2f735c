"""Decoding user photos into plain RGB images, refusing bad input before any heavy work.

Memory is bounded by the pixel count, never by the file size or the width/height ratio: the
header is checked before decoding, and every later step holds at most the image it reads, the
image it writes and one band of rows (``BAND_PIXELS``) of temporary work. At the default
64-megapixel limit that is about 512 MB (Pillow keeps RGB and RGBA at 4 bytes a pixel), plus
what some decoders hold while decoding (progressive JPEG, HEIF and WebP keep a buffer of their own).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mipha_core.errors import ImageTooLargeError, InvalidImageError

DEFAULT_MAX_PIXELS = 64_000_000
"""Large enough for 48-megapixel phone photos, small enough to refuse decompression bombs."""

BAND_PIXELS = 1 << 20
"""Pixels converted at a time: a band of float64 gray values is 8 MB, not 8 bytes a pixel of the photo."""

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@functools.cache
def _register_heif() -> None:
    """HEIC/HEIF (iPhone photos) decode through pillow-heif, registered on first use."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def load_image(
    source: bytes | str | Path | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``source`` into an RGB image with EXIF orientation applied.

    Transparency is composited on white, grayscale, CMYK and 16-bit images are converted,
    and animations give their first frame. The pixel count is checked from the header,
    before the pixels are decoded.
    """
    _register_heif()
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(stream) as image:
            _check_pixel_count(image, max_pixels)
            image.seek(0)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: never two rotated copies at once
            return image.copy() if image.mode == "RGB" else to_rgb(image)  # a copy outlives the closed file
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(
            f"the image is too large to decode safely: resize it to under {max_pixels:,} pixels and try again"
        ) from error
    except UnidentifiedImageError as error:
        raise InvalidImageError(
            "this file is not an image that can be read: send a JPEG, PNG, WebP, HEIC, GIF, BMP or TIFF photo"
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidImageError(f"the image could not be decoded, it may be truncated or corrupt ({error})") from error


def _check_pixel_count(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}×{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}: resize it and try again"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` itself when it is RGB, otherwise an RGB copy converted a band of rows at a time.

    Transparency is composited on white; 16- and 32-bit grayscale is scaled, not clipped. This is
    the one conversion to 8-bit RGB: storage's stored copy and the model's input both use it.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in {"I", "F"}:
        scale = _gray_scale(image)
        return _convert_in_bands(image, lambda band: _eight_bit_gray(band, scale).convert("RGB"))
    if image.mode in _TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        return _convert_in_bands(image, _composite_on_white)
    return _convert_in_bands(image, lambda band: band.convert("RGB"))


def image_bands(image: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """``(top, band)`` for consecutive full-width bands of about ``BAND_PIXELS`` pixels each."""
    width, height = image.size
    rows = max(1, BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield top, image.crop((0, top, width, min(top + rows, height)))


def _convert_in_bands(image: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """Apply the per-pixel ``convert`` band by band: the result equals ``convert(image)``
    while the temporary work stays one band in size."""
    output = Image.new("RGB", image.size)
    for top, band in image_bands(image):
        output.paste(convert(band), (0, top))
    return output


def _composite_on_white(band: Image.Image) -> Image.Image:
    rgba = band.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_scale(image: Image.Image) -> float:
    """The factor that brings the mode's real range to 0-255: 16-bit values (and 32-bit ones that fit)
    by 255/65535, float images in [0, 1] by 255; wider values by their peak, never clipped to white."""
    if not image.mode.startswith("I;16"):
        peak = float(np.max([np.asarray(band).max(initial=0) for _, band in image_bands(image)]))
        if image.mode == "F" and peak <= 1.0:
            return 255.0
        if peak > 65535.0 or (image.mode == "F" and peak > 0):
            return 255.0 / peak
    return 255.0 / 65535.0


def _eight_bit_gray(band: Image.Image, scale: float) -> Image.Image:
    values = np.asarray(band, dtype=np.float64)
    return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8))
