"""Two real signed-in users: Bob replays Alice's session hash and identity and gets nothing of hers.

Alice uses the app in Chromium; Bob speaks Gradio's queue protocol with his own login cookie
and whatever of Alice's he could have learnt (her session hash, her encrypted browser identity).
"""

from __future__ import annotations

import json
from contextlib import closing

import httpx
import pytest

from tests.app_process import running_app
from tests.security.gradio_protocol import dependency, login, run_event

pytestmark = pytest.mark.browser

ALICE_QUESTION = "Alice's private question about her cat"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def two_user_app(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("two-users")
    with running_app(data_dir, "--auth", "alice:alice-pw", "--auth", "bob:bob-pw", name="two-users") as app:
        yield app


@pytest.fixture(scope="module")
def alice(two_user_app, app_browser):
    """Alice signed in, with one conversation; yields (her session hash, her visitor cookie)."""
    context = app_browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    session_hashes: set[str] = set()
    page.on("request", lambda r: session_hashes.add(json.loads(r.post_data)["session_hash"])
            if "/queue/join" in r.url and r.post_data else None)
    signed_in = context.request.post(two_user_app.url + "login", form={"username": "alice", "password": "alice-pw"})
    assert signed_in.ok, signed_in.status
    page.goto(two_user_app.url)
    page.locator("#chat-input textarea:not([disabled])").wait_for()
    page.locator("#chat-input textarea").fill(ALICE_QUESTION)
    page.locator("#send-button").click()
    page.locator("#conversation-list label", has_text="Alice").wait_for()
    visitor_cookie = next((c["value"] for c in context.cookies() if c["name"] == "mipha-visitor"), None)
    assert len(session_hashes) == 1
    yield session_hashes.pop(), visitor_cookie
    context.close()


def bob_client(app, *, cookies: dict[str, str] | None = None) -> httpx.Client:
    client = httpx.Client(base_url=app.url, timeout=30, cookies=cookies)
    login(client, "bob", "bob-pw")
    return client


def search_event(client: httpx.Client, *, session_hash: str) -> dict:
    config = client.get("config").json()
    search = dependency(config, elem_id="search-box", event="change")
    data = [None] * len(search.inputs)
    data[search.inputs.index(search.trigger_id)] = ""  # the search text
    return run_event(client, search, data, session_hash=session_hash)


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
    assert replayed.get("success") is True, replayed  # the session is let through, the login decides the owner
    assert "Alice" not in json.dumps(replayed)
