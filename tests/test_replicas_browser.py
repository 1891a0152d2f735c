"""Two replicas of the app on one PostgreSQL database, and a browser that moves between them.

Each replica has its own data directory; both start at the same moment on an empty database (the
migration lock lets both come up). The visitor's identity is the cookie, which the database knows,
so whichever replica the browser reaches shows the same conversations and photos.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.app_process import running_app
from tests.browser_support import open_app, screenshot, started_together, visitor, wait_for_reply_end

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def test_a_browser_moving_between_replicas_keeps_its_conversations_and_photos(
        app_browser, tmp_path: Path, postgres_empty_database: str) -> None:
    replicas = [running_app(tmp_path / name, "--database-url", postgres_empty_database, name=f"replica-{name}")
                for name in ("a", "b")]
    with started_together(*replicas) as (first, second), visitor(app_browser) as context:
        page = open_app(context, first.url)
        page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / "chelsea.jpg"))
        page.locator("#chat-input textarea").fill("What is in this photo?")
        page.locator("#send-button").click()
        wait_for_reply_end(page, count=1)

        other = open_app(context, second.url)  # the same browser, now reaching the other replica
        entry = other.locator("#conversation-list label", has_text="What is in this photo?")
        expect(entry).to_have_count(1)
        entry.click()
        photo = other.locator("#chatbot [data-testid=user] img")
        expect(photo).to_have_count(1)
        expect(photo).to_have_js_property("complete", True)
        assert photo.evaluate("img => img.naturalWidth") > 0, "the other replica did not serve the photo"
        other.locator("#chat-input textarea").fill("And its colours?")
        other.locator("#send-button").click()
        wait_for_reply_end(other, count=2)
        screenshot(other, "replica-b-continues")

        page.reload()
        expect(page.locator("#chatbot [data-testid=user]", has_text="And its colours?")).to_have_count(1)
        expect(page.locator("#chatbot .reply-footer")).to_have_count(2)
        assert re.search(r"\w", page.locator("#chatbot [data-testid=bot]").last.inner_text())
