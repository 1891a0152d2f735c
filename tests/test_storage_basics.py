"""Opening a data directory: migrations, database settings, users, import hygiene (both backends)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

import storage as st
from storage.models import Base, User
from tests.storage_helpers import Configure, make_user, postgresql_only, sqlite_only

pytest_plugins = ("tests.storage_fixtures",)  # the backend, data_dir and storage fixtures

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_importing_storage_does_not_import_torch_or_gradio() -> None:
    """Storage shares mipha_core's photo conversion (`mipha_core.images`), never the model's stack."""
    code = (
        "import sys, storage\n"
        "heavy = sorted(m for m in ('torch', 'gradio', 'transformers', 'mipha_core.engine', 'app', 'psycopg')\n"
        "               if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_migrated_database_matches_the_models(storage: st.Storage) -> None:
    with storage.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() is not None


def test_schema_is_created_by_alembic_not_create_all(storage: st.Storage) -> None:
    tables = set(inspect(storage.engine).get_table_names())
    assert {"alembic_version", "users", "conversations", "messages", "images", "image_blobs", "replicas"} <= tables


def test_reopening_is_idempotent(storage_config: Configure) -> None:
    config = storage_config()
    first = st.open_storage(config)
    user = make_user(first, "ana")
    first.close()
    second = st.open_storage(config)
    assert make_user(second, "ana") == user
    second.close()


@sqlite_only
def test_sqlite_runs_with_wal_foreign_keys_and_busy_timeout(storage: st.Storage) -> None:
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 15_000


@postgresql_only
def test_postgresql_waits_for_locks_as_long_as_sqlite_does(storage: st.Storage) -> None:
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW lock_timeout").scalar() == "15s"


def test_database_url_overrides_the_default_location(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    opened = st.open_storage(st.StorageConfig(data_dir=tmp_path / "data", database_url=url))
    make_user(opened, "ana")
    opened.close()
    assert (tmp_path / "elsewhere.db").is_file()
    assert not (tmp_path / "data" / "mipha.sqlite3").exists()
    assert (tmp_path / "data" / "images").is_dir()


def test_browser_secret_is_stored_only_as_a_hash(storage: st.Storage) -> None:
    secret = "browser-secret-0123456789abcdef"
    with storage.session() as session:
        user = st.user_for_browser_secret(session, secret=secret)
        again = st.user_for_browser_secret(session, secret=secret)
        other = st.user_for_browser_secret(session, secret=secret + "x")
        identity = session.get(User, user.id).identity
    assert user == again and other.id != user.id
    assert user.kind is st.UserKind.ANONYMOUS and user.name is None
    assert secret not in identity and len(identity) == 64
    with storage.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM users WHERE identity = :s"), {"s": secret}).scalar() == 0
    if not storage.config.is_shared:
        assert secret.encode() not in (storage.config.data_dir / "mipha.sqlite3").read_bytes()


def test_user_kinds_are_separate_identities(storage: st.Storage) -> None:
    with storage.session() as session:
        password = st.user_for_password_login(session, username=" ana ")
        oauth = st.user_for_oauth(session, username="ana")
        assert st.user_for_password_login(session, username="ana") == password
        assert st.get_user(session, user_id=oauth.id) == oauth
    assert password.id != oauth.id
    assert (password.kind, password.name) == (st.UserKind.PASSWORD, "ana")
    assert (oauth.kind, oauth.name) == (st.UserKind.OAUTH, "ana")


@pytest.mark.parametrize("secret", ["", "short", "x" * 1000])
def test_weak_or_odd_browser_secrets_are_refused(storage: st.Storage, secret: str) -> None:
    with storage.session() as session, pytest.raises(st.InvalidInputError, match="browser identity"):
        st.user_for_browser_secret(session, secret=secret)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_image_bytes"):
        st.StorageLimits(max_image_bytes=0)


def test_a_failing_unit_of_work_is_rolled_back(storage: st.Storage) -> None:
    with pytest.raises(RuntimeError), storage.session() as session:
        st.user_for_oauth(session, username="ghost")
        raise RuntimeError("boom")
    engine = create_engine(storage.config.resolved_database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM users")).scalar() == 0
    engine.dispose()
