"""Fixtures for tests/test_storage_*.py, loaded there through pytest_plugins.

Storage tests run on both backends: ``backend`` is "sqlite" (a file in the data dir) or
"postgresql" (a fresh database on the session's throwaway server, tests/postgres_fixtures.py).
A test about one backend's own behaviour says so with ``sqlite_only`` or ``postgresql_only``
(tests/storage_helpers.py); a module about SQLite alone (fault injection on its file) overrides
``backend``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage import Storage, StorageConfig, open_storage
from tests.storage_helpers import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """None for SQLite in the data dir; for PostgreSQL, a fresh database with the schema at head."""
    if backend == "sqlite":
        return None
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def storage_config(data_dir: Path, database_url: str | None) -> Callable[..., StorageConfig]:
    """``storage_config(**options)``: a StorageConfig for this test's data dir and backend."""

    def config(**options: object) -> StorageConfig:
        return StorageConfig(data_dir=data_dir, database_url=database_url, **options)

    return config


@pytest.fixture
def storage(storage_config: Callable[..., StorageConfig]) -> Iterator[Storage]:
    opened = open_storage(storage_config())
    yield opened
    opened.close()
