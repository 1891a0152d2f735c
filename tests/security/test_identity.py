"""Two real signed-in users: Bob replays Alice's session hash and identity and gets nothing of hers.

Alice uses the app in Chromium; Bob speaks Gradio's queue protocol with his own login cookie
and whatever of Alice's he could have learnt (her session hash, her encrypted browser identity).
"""

from __future__ import annotations

import json
import time
from contextlib import closing

import httpx
import pytest
from playwright.sync_api import expect

from tests.app_process import running_app
from tests.security.gradio_protocol import data_for, dependency, login, queue_messages, run_event

pytestmark = pytest.mark.browser

ALICE_QUESTION = "Alice's private question about her cat"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def two_user_app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("two-users")
    with running_app(data_dir, "--auth", "alice:alice-pw", "--auth", "bob:bob-pw", name="two-users") as app:
        yield app


def alice_asks(app, browser):
    """Alice signed in, her question sent; (her context, page, the session hashes her page used)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    session_hashes: set[str] = set()
    page.on("request", lambda r: session_hashes.add(json.loads(r.post_data)["session_hash"])
            if "/queue/join" in r.url and r.post_data else None)
    signed_in = context.request.post(app.url + "login", form={"username": "alice", "password": "alice-pw"})
    assert signed_in.ok, signed_in.status
    page.goto(app.url)
    page.locator("#chat-input textarea:not([disabled])").wait_for()
    page.locator("#chat-input textarea").fill(ALICE_QUESTION)
    page.locator("#send-button").click()
    page.locator("#conversation-list label", has_text="Alice").first.wait_for()  # each test of the module adds one of hers
    return context, page, session_hashes


def visitor_cookie(context) -> str | None:
    return next((c["value"] for c in context.cookies() if c["name"] == "mipha-visitor"), None)


@pytest.fixture(scope="module")
def alice(two_user_app, app_browser):
    """Alice signed in, with one answered question; yields (her session hash, her visitor cookie)."""
    context, page, session_hashes = alice_asks(two_user_app, app_browser)
    page.locator("#chatbot .reply-footer").wait_for()  # her reply has ended: her page waits for nothing
    assert len(session_hashes) == 1
    yield session_hashes.pop(), visitor_cookie(context)
    context.close()


def bob_client(app, *, cookies: dict[str, str] | None = None) -> httpx.Client:
    client = httpx.Client(base_url=app.url, timeout=30, cookies=cookies)
    login(client, "bob", "bob-pw")
    return client


def search_event(client: httpx.Client, *, session_hash: str) -> dict:
    config = client.get("config").json()
    search = dependency(config, elem_id="search-box", event="change")
    return run_event(client, search, data_for(config, search, {"search-box": ""}), session_hash=session_hash)


def test_a_replayed_session_hash_shows_bob_nothing_of_alice(two_user_app, alice):
    alice_session, _ = alice
    with closing(bob_client(two_user_app)) as bob:
        replayed = search_event(bob, session_hash=alice_session)
    assert "Alice" not in json.dumps(replayed)
    assert replayed["msg"] == "refused" and replayed["status_code"] == 403  # her session is bound to her browser


def test_even_with_her_browser_cookie_bob_sees_only_his_own(two_user_app, alice):
    alice_session, alice_cookie = alice
    assert alice_cookie is not None
    with closing(bob_client(two_user_app, cookies={"mipha-visitor": alice_cookie})) as bob:
        replayed = search_event(bob, session_hash=alice_session)
    assert "Alice" not in json.dumps(replayed)
    assert replayed["msg"] == "refused" and replayed["status_code"] == 403  # bound to her login too


def test_with_her_browser_cookie_bob_cannot_listen_to_her_reply_as_it_is_written(two_user_app, app_browser):
    """A reply is written by a job the page follows for seconds; its messages are Alice's alone."""
    context, page, session_hashes = alice_asks(two_user_app, app_browser)
    try:
        expect(page.locator("#stop-button")).to_be_enabled(timeout=30_000)  # her 512-token reply is being written
        (alice_session,) = session_hashes
        heard: list[dict] = []
        with closing(bob_client(two_user_app, cookies={"mipha-visitor": visitor_cookie(context)})) as bob:
            config = bob.get("config").json()
            search = dependency(config, elem_id="search-box", event="change")
            bob.post("gradio_api/queue/join", json={
                "data": data_for(config, search, {"search-box": ""}), "fn_index": search.fn_index,
                "trigger_id": search.trigger_id, "session_hash": alice_session, "event_data": None})
            deadline = time.monotonic() + 20
            for message in queue_messages(bob, session_hash=alice_session, timeout=30):
                heard.append(message)
                if time.monotonic() > deadline:
                    break
        assert heard and not any("Alice" in json.dumps(message) for message in heard), heard[:3]
    finally:
        context.close()
