"""Shared fixtures. App and browser fixtures are grouped below and prefixed `app_`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app_process import ARTIFACTS, running_app

pytest_plugins = ("tests.postgres_fixtures",)  # a throwaway PostgreSQL server, a database per test

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# --- app fixtures: the tiny engine, storage and Services for handler tests ---------------------


@pytest.fixture(scope="session")
def app_tiny_engine(tmp_path_factory: pytest.TempPathFactory):
    """The offline tiny model, built once per test session."""
    from mipha_core import load_engine

    return load_engine("tiny", device="cpu", dtype="float32", data_dir=tmp_path_factory.mktemp("app-models"))


@pytest.fixture
def app_services(tmp_path: Path, app_tiny_engine):
    """Services over a real SQLite file in a temporary data dir and a ready tiny engine."""
    from app.model_slot import ModelSlot
    from app.services import Services
    from app.settings import Settings
    from storage import StorageConfig, open_storage

    settings = Settings(model="tiny", data_dir=tmp_path, max_new_tokens=64, max_message_chars=500)
    storage = open_storage(StorageConfig(data_dir=tmp_path))
    services = Services(settings=settings, storage=storage, model=ModelSlot.ready(app_tiny_engine))
    yield services
    services.replies.close()  # replies still being written stop before their storage closes
    storage.close()


@pytest.fixture
def app_handlers(app_services):
    """The page's handlers over `app_services` (their replies stop when the services close)."""
    from app.handlers import Handlers

    return Handlers(app_services)


# --- browser fixtures: the real app in a subprocess and headless Chromium ----------------------


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`launch.py --model tiny` on a free localhost port; yields its URL."""
    data_dir = tmp_path_factory.mktemp("app-data")
    # replies of up to 512 tokens: seconds, time to press Stop
    with running_app(data_dir, env={"MIPHA_MAX_NEW_TOKENS": "1024"}, name="browser-server") as app:
        yield app.url


@pytest.fixture(scope="module")
def app_browser():
    """Headless Debian Chromium through Playwright (never `playwright install`)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-chromium.sh (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def app_screenshot():
    """`shot(page, name)` saves test-artifacts/NAME.png."""
    ARTIFACTS.mkdir(exist_ok=True)

    def shot(page, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return shot
