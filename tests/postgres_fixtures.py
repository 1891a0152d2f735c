"""PostgreSQL fixtures: one throwaway server per test session, a fresh database per test.

Registered for every test in tests/conftest.py. The server starts on first use only, so
test runs that need no PostgreSQL never start one; when it cannot start, the tests that need
it fail with the reason (never skip: CI installs PostgreSQL with scripts/install-postgres.sh).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.postgres import PostgresServer, PostgresUnavailable, start_server

TEMPLATE = "mipha_at_head"
_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL cluster for this session, stopped and removed at its end."""
    try:
        server = start_server()
    except PostgresUnavailable as e:
        pytest.fail(f"PostgreSQL could not be started for the tests: {e}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    """A database migrated to head once; each test's database is a copy (faster than migrating)."""
    from storage import StorageConfig
    from storage.db import create_storage_engine
    from storage.migrate import upgrade_to_head

    url = postgres_server.create_database(TEMPLATE)
    engine = create_storage_engine(StorageConfig(data_dir=postgres_server.root, database_url=url))
    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()  # CREATE DATABASE ... TEMPLATE needs the template without connections
    return TEMPLATE


@pytest.fixture
def postgres_database(postgres_server: PostgresServer, postgres_template: str) -> Iterator[str]:
    """The SQLAlchemy URL of a new database with the schema at head, dropped after the test."""
    name = f"test_{next(_names)}"
    url = postgres_server.create_database(name, template=postgres_template)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture
def postgres_empty_database(postgres_server: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database (no tables), dropped after the test."""
    name = f"empty_{next(_names)}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)
