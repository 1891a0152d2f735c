"""PostgreSQL failures reach people as storage's sentences and operators as one line, never as tracebacks.

The same mapping as SQLite's (tests/security/test_storage_faults.py): a database that cannot be
reached, a lock held past the timeout, and what each SQLSTATE becomes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import storage as st
from storage.failures import failure_kind
from tests.app_process import free_port
from tests.postgres import PostgresServer
from tests.storage_helpers import make_conversation, make_user

LEAKS = ("SELECT", "INSERT", "UPDATE", "psycopg", "postgresql", "127.0.0.1", "FATAL", "Error", "Traceback")


def assert_for_a_person(error: st.StorageError) -> None:
    assert not any(leak in str(error) for leak in LEAKS), str(error)


@pytest.fixture
def database_name(postgres_database: str) -> str:
    return postgres_database.rsplit("/", 1)[1]


@pytest.fixture
def impatient(tmp_path: Path, postgres_database: str) -> Iterator[st.Storage]:
    config = st.StorageConfig(data_dir=tmp_path / "data", database_url=postgres_database, busy_timeout_ms=300)
    with st.open_storage(config) as opened:
        yield opened


def test_an_unreachable_database_is_refused_at_start_up_with_the_way_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://mipha:s3cret@127.0.0.1:{port}/chats"
    with pytest.raises(st.DatabaseUnreachableError) as refused:
        st.open_storage(st.StorageConfig(data_dir=tmp_path / "data", database_url=url))
    (logged,) = [r for r in caplog.records if "Connection refused" in r.getMessage()]
    assert logged.exc_info is None and "s3cret" not in caplog.text  # the driver's words; no traceback, no password
    assert isinstance(refused.value, st.DataDirError)  # launch.py prints these as one line
    assert str(refused.value) == (
        f"Mipha Chat cannot reach its database postgresql+psycopg://mipha:***@127.0.0.1:{port}/chats "
        "(connection refused). Start the database, or check --database-url (MIPHA_DATABASE_URL)."
    )
    st.open_storage(st.StorageConfig(data_dir=tmp_path / "data")).close()  # the data dir's lock was released


def test_a_database_that_stops_answering_is_unreachable_then_recovers(
    impatient: st.Storage, postgres_server: PostgresServer, database_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    user = make_user(impatient, "ana")
    name = sql.Identifier(database_name)
    with postgres_server.connect() as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database_name,))
    with caplog.at_level(logging.ERROR, logger="storage.failures"):
        with pytest.raises(st.StorageUnreachableError) as unreachable:
            make_conversation(impatient, user)
    assert isinstance(unreachable.value, st.StorageUnavailableError)
    assert "cannot reach its conversation database" in str(unreachable.value)
    assert_for_a_person(unreachable.value)
    assert "not currently accepting connections" in caplog.text  # the details are in the log

    with postgres_server.connect() as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))
    assert make_conversation(impatient, user).owner_id == user.id  # the next unit of work reconnects


def test_a_conversation_locked_past_the_timeout_is_busy(
    impatient: st.Storage, postgres_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another writer (a replica, a maintenance script) holds the conversation's row."""
    user = make_user(impatient, "ana")
    conversation = make_conversation(impatient, user)
    with psycopg.connect(postgres_database.replace("postgresql+psycopg", "postgresql")) as other:
        other.execute("SELECT id FROM conversations WHERE id = %s FOR UPDATE", (conversation.id,))
        with caplog.at_level(logging.WARNING, logger="storage.failures"):
            with pytest.raises(st.StorageBusyError) as busy, impatient.session() as session:
                st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="Hello?")
    assert str(busy.value) == "The conversation database is busy; try again in a few seconds."
    # busy clears by itself: a warning, not an error
    assert [r.levelno for r in caplog.records if "lock timeout" in r.getMessage()] == [logging.WARNING]
    with impatient.session() as session:  # the lock is gone with the other transaction
        st.add_user_message(session, owner_id=user.id, conversation_id=conversation.id, text="Hello?")


class FakePostgresError(Exception):
    """Stands in for a psycopg error: what failure_kind reads is ``sqlstate``."""

    def __init__(self, sqlstate: str | None, message: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("40001", st.StorageBusyError),  # serialization failure
        ("40P01", st.StorageBusyError),  # deadlock detected
        ("55P03", st.StorageBusyError),  # lock_timeout
        ("57014", st.StorageBusyError),  # statement_timeout
        ("53300", st.StorageBusyError),  # too many connections
        ("53100", st.StorageFullError),  # disk full
        ("25006", st.StorageReadOnlyError),  # a read-only standby
        ("42501", st.StorageReadOnlyError),  # no privilege to write
        ("08006", st.StorageUnreachableError),  # connection failure
        ("57P01", st.StorageUnreachableError),  # the server is shutting down
        ("23505", st.StorageUnavailableError),  # anything else: the generic sentence
    ],
)
def test_sqlstates_map_to_the_storage_errors_people_read(sqlstate: str, kind: type[st.StorageError]) -> None:
    assert failure_kind(FakePostgresError(sqlstate)) is kind
