"""Fixtures for the model tests: tiny checkpoints in the original Mipha format, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mipha_core import Engine, load_engine
from mipha_core.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def engine(tiny_checkpoint: Path) -> Engine:
    return load_engine(str(tiny_checkpoint), device="cpu", dtype="float32")


@pytest.fixture
def photo() -> Image.Image:
    """A landscape photo-like image with structure (a gradient and a block), not a flat colour."""
    image = Image.linear_gradient("L").resize((320, 200)).convert("RGB")
    image.paste((200, 40, 40), (40, 30, 120, 110))
    return image


def user(text: str, image: Image.Image | None = None) -> dict:
    content = [{"type": "image", "image": image}] if image is not None else []
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}
