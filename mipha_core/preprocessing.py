"""SigLIP preprocessing as Mipha does it: pad to a square, then the PIL SigLIP processor.

Mipha pads the photo to a square of its longer side and resizes that to the vision tower's
size. Building the square is what a very wide or tall photo cannot afford (a 65535×610
panorama needs a 65535×65535 canvas, 17 GB), so ``pad_and_resize`` computes the same pixels
without it; photos whose longer side exceeds ``MAX_SIDE`` are first shrunk by a whole factor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mipha_core.images import BAND_PIXELS, to_rgb

_PROCESSOR_KEYS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)

MAX_SIDE = 16_384
"""Longest side preprocessed as it is. Every photo up to it (48 MP phone photos, panoramas
16384 wide) gets exactly Mipha's pixels; longer ones are shrunk first, which bounds the
time a tall image costs (it grows with the square of the longer side: about 2 s at this bound)."""


def pad_and_resize(
    image: Image.Image,
    size: tuple[int, int],
    *,
    background: tuple[int, ...],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """``image`` centred on a square of its longer side filled with ``background``, resized to
    ``size`` (width, height): bit for bit what Mipha's ``expand2square`` then ``resize`` give.

    Pillow resizes horizontally, then vertically, through an 8-bit intermediate of
    ``size[0]`` × side pixels. This builds that intermediate directly: rows of padding are
    resized once, rows of the image a band at a time, so the square canvas never exists.
    """
    width, height = image.size
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    columns = Image.new(image.mode, (size[0], side))
    blank = Image.new(image.mode, (side, 1), background).resize((size[0], 1), resample)
    _fill_rows(columns, blank, start=0, stop=top)
    _fill_rows(columns, blank, start=top + height, stop=side)
    rows_per_band = max(1, BAND_PIXELS // side)
    for y in range(0, height, rows_per_band):
        band = image.crop((0, y, width, min(y + rows_per_band, height)))
        if width < side:
            padded = Image.new(image.mode, (side, band.height), background)
            padded.paste(band, (left, 0))
            band = padded
        columns.paste(band.resize((size[0], band.height), resample), (0, top + y))
    return columns.resize(size, resample)


def _fill_rows(columns: Image.Image, row: Image.Image, *, start: int, stop: int) -> None:
    """Copy the one-row image ``row`` into rows ``start``..``stop`` (nearest-neighbour repeats it exactly)."""
    if stop > start:
        columns.paste(row.resize((row.width, stop - start), Image.Resampling.NEAREST), (0, start))


def shrink_to_side(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` itself if its longer side is at most ``max_side``, else reduced by the smallest
    whole factor that brings it there (a box filter: no resampling tables, output-sized memory)."""
    factor = math.ceil(max(image.size) / max_side)
    return image if factor <= 1 else image.reduce(factor)


class ImagePreprocessor:
    """Turns an image into the ``pixel_values`` the vision tower takes.

    The PIL processor is chosen explicitly: the original Mipha preprocessed with PIL, and
    the torchvision variant resizes slightly differently. Padding and resizing happen here
    (``pad_and_resize``), so the processor only rescales and normalises an image already at
    its size; its own resize is then a copy and the result is unchanged.
    """

    def __init__(self, processor: SiglipImageProcessorPil, *, max_side: int = MAX_SIDE) -> None:
        if not (processor.size.height and processor.size.width):
            raise ValueError(f"the image processor must resize to a fixed height and width, got size={processor.size}")
        self.processor = processor
        self.size = (processor.size.width, processor.size.height)
        self.background = tuple(int(mean * 255) for mean in processor.image_mean)
        self.max_side = max_side

    @classmethod
    def from_checkpoint(cls, folder: Path, *, image_size: int) -> "ImagePreprocessor":
        """Read ``preprocessor_config.json``; without one, use SigLIP's 0.5/0.5 at ``image_size``."""
        settings: dict = {"size": {"height": image_size, "width": image_size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        config_file = folder / "preprocessor_config.json"
        if config_file.is_file():
            stored = json.loads(config_file.read_text())
            settings.update({key: stored[key] for key in _PROCESSOR_KEYS if key in stored})
        return cls(SiglipImageProcessorPil(**settings))

    def model_image(self, image: Image.Image) -> Image.Image:
        """``image`` padded to a square and resized to the tower's size: what the model sees, as a photo."""
        rgb = shrink_to_side(to_rgb(image), self.max_side)
        return pad_and_resize(rgb, self.size, background=self.background, resample=self.processor.resample)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Pixel values of shape ``(1, 3, H, W)``, float32."""
        return self.processor(images=self.model_image(image), return_tensors="pt")["pixel_values"]
