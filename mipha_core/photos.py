"""Photos known by a content hash, and the photo → projected features step every engine shares.

A follow-up question about a photo should cost no image work: the conversation's KV cache
already covers the image, so the photo is identified by its stored file's hash
(``StoredPhoto``) and decoded only when its pixels are needed, that is when neither the KV
cache nor the feature cache has it. After a feature-cache eviction, the 384-px model input is
usually still kept, so re-encoding does not decode the full-resolution file again.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from mipha_core.caching import ByteBoundedLRU
from mipha_core.images import image_bands
from mipha_core.preprocessing import ImagePreprocessor


@dataclass(frozen=True)
class StoredPhoto:
    """A photo known by its storage's content hash (the sha256 of the file), decoded only by ``open``.

    ``open`` may raise whatever the storage raises when the file is gone; it is called only
    when the photo's pixels are needed.
    """

    key: str
    open: Callable[[], Image.Image]


Photo = Image.Image | StoredPhoto
"""A decoded photo, or a stored one that is decoded when its pixels are needed."""


def photo_key(photo: Photo) -> str:
    """The photo's identity for the caches; a ``StoredPhoto`` is not decoded for it.

    Stored photos are known by their file's hash, decoded ones by their pixels' hash; the
    prefix keeps the two kinds apart, so the same photo sent both ways only misses the caches.
    """
    if isinstance(photo, StoredPhoto):
        return f"file-sha256:{photo.key}"
    return image_key(photo)


def open_photo(photo: Photo) -> Image.Image:
    """The photo's pixels: decodes a ``StoredPhoto``, returns a decoded one as it is."""
    return photo.open() if isinstance(photo, StoredPhoto) else photo


def image_key(image: Image.Image) -> str:
    """A content hash of the decoded pixels, so the same photo matches however it arrived.

    Hashed a band of rows at a time: the same digest as hashing ``image.tobytes()``, without
    a copy of the whole photo (and Pillow's twice-as-large join) just to hash it."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.size}".encode())
    for _, band in image_bands(image):
        digest.update(band.tobytes())
    return digest.hexdigest()


class PhotoFeatures:
    """Photo → projected image features ``(image_tokens, hidden)``, cached per owner and photo.

    ``encode`` takes the preprocessor's ``pixel_values`` (``(1, 3, H, W)``, float32 on the CPU)
    and returns the features; moving them to the model's device and dtype is its job. Features
    are kept per (owner, ``photo_key``) within ``max_bytes``; the model inputs of the last
    ``model_inputs`` photos are kept too (1.8 MB each at 384 px), so that a photo whose
    features were evicted is encoded again without decoding its file. An owner's photos never
    serve another owner; ``owner=None`` keeps nothing, and neither does ``max_bytes=0``.
    """

    def __init__(self, *, preprocessor: ImagePreprocessor, encode: Callable[[torch.Tensor], torch.Tensor],
                 max_bytes: int, model_inputs: int = 8) -> None:
        if max_bytes < 0 or model_inputs < 0:
            raise ValueError(f"max_bytes and model_inputs must be >= 0, got {max_bytes} and {model_inputs}")
        self.preprocessor = preprocessor
        self._encode = encode
        self.features: ByteBoundedLRU[torch.Tensor] = ByteBoundedLRU(max_bytes)
        # counted, not sized: each entry counts 1
        self.model_inputs: ByteBoundedLRU[torch.Tensor] = ByteBoundedLRU(model_inputs if max_bytes else 0)

    def get(self, photo: Photo, *, owner: str | None) -> tuple[torch.Tensor, float | None]:
        """The photo's features and the seconds the image work took (preprocessing, and decoding
        when the model input was not kept, then the vision tower); None when they were cached."""
        key = (owner, photo_key(photo))
        cached = self.features.get(key) if owner is not None else None
        if cached is not None:
            return cached, None
        started = time.perf_counter()
        with torch.no_grad():
            features = self._encode(self._pixel_values(photo, key=key if owner is not None else None))
        seconds = time.perf_counter() - started
        if owner is not None:
            self.features.put(key, features, features.numel() * features.element_size())
        return features, seconds

    def _pixel_values(self, photo: Photo, *, key: tuple[str, str] | None) -> torch.Tensor:
        kept = self.model_inputs.get(key) if key is not None else None
        if kept is not None:
            return kept
        pixels = self.preprocessor(open_photo(photo))
        if key is not None:
            self.model_inputs.put(key, pixels, 1)
        return pixels
