"""Fixtures (data_dir, storage) for tests/test_storage_*.py, loaded there through pytest_plugins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import Storage, StorageConfig, open_storage


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def storage(data_dir: Path) -> Iterator[Storage]:
    opened = open_storage(StorageConfig(data_dir=data_dir))
    yield opened
    opened.close()
