"""Stored photos are decoded only when their pixels are needed; their features and model inputs
are kept per owner, so re-encoding after an eviction does not decode the file again."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mipha_core.fitting import PreparedPrompt
from mipha_core.photos import PhotoFeatures, StoredPhoto, image_key, open_photo, photo_key
from tests.core.conftest import user


class Opener:
    """A stored photo's ``open`` that counts its calls."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.calls = 0

    def __call__(self) -> Image.Image:
        self.calls += 1
        return self.image.copy()


class Encoder:
    """Stands in for the vision tower: counts calls, returns features of the model input's size."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.inputs.append(pixel_values)
        return pixel_values.reshape(-1, 3)[:16].clone()


@pytest.fixture
def opener(photo) -> Opener:
    return Opener(photo)


@pytest.fixture
def stored(opener) -> StoredPhoto:
    return StoredPhoto(key="ab" * 32, open=opener)


def features(engine, *, max_bytes: int = 10**6, model_inputs: int = 8) -> tuple[PhotoFeatures, Encoder]:
    encoder = Encoder()
    return PhotoFeatures(preprocessor=engine.preprocessor, encode=encoder, max_bytes=max_bytes,
                         model_inputs=model_inputs), encoder


def test_a_stored_photo_is_known_by_its_file_hash_without_decoding(stored, opener, photo):
    assert photo_key(stored) == "file-sha256:" + "ab" * 32 and opener.calls == 0
    assert photo_key(photo) == image_key(photo) == image_key(photo.copy()) != photo_key(stored)
    assert open_photo(stored).tobytes() == photo.tobytes() and opener.calls == 1
    assert open_photo(photo) is photo


def test_features_are_encoded_once_per_owner_and_photo(engine, stored, opener):
    kept, encoder = features(engine)
    first, seconds = kept.get(stored, owner="ada")
    again, cached_seconds = kept.get(stored, owner="ada")
    assert seconds is not None and cached_seconds is None and again is first
    assert len(encoder.inputs) == 1 and opener.calls == 1
    assert encoder.inputs[0].shape == (1, 3, *engine.preprocessor.size[::-1])
    _, stranger_seconds = kept.get(stored, owner="bob")  # one owner's photos never serve another
    assert stranger_seconds is not None and len(encoder.inputs) == 2 and opener.calls == 2


def test_an_evicted_photo_is_encoded_again_from_its_kept_model_input(engine, stored, opener):
    kept, encoder = features(engine, max_bytes=1)  # features never fit: as if evicted at once
    kept.get(stored, owner="ada")
    _, seconds = kept.get(stored, owner="ada")
    assert seconds is not None and len(encoder.inputs) == 2
    assert opener.calls == 1  # the 384-px model input was kept: the file was decoded once
    torch.testing.assert_close(encoder.inputs[0], encoder.inputs[1])


def test_nothing_is_kept_without_an_owner_or_a_budget(engine, stored, opener):
    kept, encoder = features(engine)
    kept.get(stored, owner=None)
    kept.get(stored, owner=None)
    assert opener.calls == 2 and len(encoder.inputs) == 2 and len(kept.features) == 0
    for off in (features(engine, max_bytes=0)[0], features(engine, model_inputs=0, max_bytes=1)[0]):
        off.get(stored, owner="ada")
        off.get(stored, owner="ada")
    assert opener.calls == 6


def test_model_inputs_are_bounded_by_count(engine, photo):
    kept, _ = features(engine, max_bytes=1, model_inputs=2)
    openers = [Opener(photo) for _ in range(3)]
    for index, opener in enumerate(openers):
        kept.get(StoredPhoto(key=f"{index:064x}", open=opener), owner="ada")
    kept.get(StoredPhoto(key=f"{0:064x}", open=openers[0]), owner="ada")
    assert len(kept.model_inputs) == 2 and [o.calls for o in openers] == [2, 1, 1]


def test_prepare_and_the_prompt_take_a_stored_photo_without_decoding_it(engine, stored, opener):
    prepared: PreparedPrompt = engine.prepare([user("What is in this photo?", stored)], max_new_tokens=8)
    assert prepared.image is stored and prepared.image_sent and opener.calls == 0
    assert engine.image_token_id in prepared.token_ids
    inputs = engine.encode([user("What is in this photo?", stored)])  # pixels needed: decoded now
    assert opener.calls == 1 and inputs["pixel_values"].shape[0] == 1
