"""Decoding user photos into plain RGB images, refusing bad input before any heavy work."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mipha_core.errors import ImageTooLargeError, InvalidImageError

DEFAULT_MAX_PIXELS = 64_000_000
"""Large enough for 48-megapixel phone photos, small enough to refuse decompression bombs."""

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
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"the image is {width}×{height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,}: resize it and try again"
                )
            image.seek(0)
            image.load()
            oriented = ImageOps.exif_transpose(image)
            return _to_rgb(oriented)
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


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode in {"I", "F"}:
        image = _eight_bit_gray(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _eight_bit_gray(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale hold values up to 65535: scale instead of clipping."""
    values = np.asarray(image, dtype=np.float64)
    scale = 255.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else 255.0 / 65535.0
    return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), mode="L")
