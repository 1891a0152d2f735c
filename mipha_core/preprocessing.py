"""SigLIP preprocessing as Mipha does it: pad to a square, then the PIL SigLIP processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

_PROCESSOR_KEYS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)


def pad_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Centre ``image`` on a square canvas of its longer side (Mipha's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImagePreprocessor:
    """Turns an RGB image into the ``pixel_values`` the vision tower takes.

    The PIL processor is chosen explicitly: the original Mipha preprocessed with PIL, and
    the torchvision variant resizes slightly differently.
    """

    def __init__(self, processor: SiglipImageProcessorPil) -> None:
        self.processor = processor
        self.background = tuple(int(mean * 255) for mean in processor.image_mean)

    @classmethod
    def from_checkpoint(cls, folder: Path, *, image_size: int) -> "ImagePreprocessor":
        """Read ``preprocessor_config.json``; without one, use SigLIP's 0.5/0.5 at ``image_size``."""
        settings: dict = {"size": {"height": image_size, "width": image_size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        config_file = folder / "preprocessor_config.json"
        if config_file.is_file():
            stored = json.loads(config_file.read_text())
            settings.update({key: stored[key] for key in _PROCESSOR_KEYS if key in stored})
        return cls(SiglipImageProcessorPil(**settings))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Pixel values of shape ``(1, 3, H, W)``, float32."""
        square = pad_to_square(image.convert("RGB"), self.background)
        return self.processor(images=square, return_tensors="pt")["pixel_values"]
