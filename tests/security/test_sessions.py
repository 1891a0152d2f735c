"""Anonymous visitors: identity in an HttpOnly cookie, and a session hash usable by its own browser only."""

from __future__ import annotations

import secrets
from contextlib import closing

import httpx
import pytest

from tests.app_process import running_app
from tests.security.gradio_protocol import dependency, queue_messages, run_event

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("sessions"), name="sessions") as running:
        yield running


def visitor(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    client.get("")
    return client


def test_the_visitor_cookie_is_http_only_and_same_site(app):
    response = httpx.get(app.url)
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("mipha-visitor=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "mipha-visitor" not in httpx.get(app.url, cookies={"mipha-visitor": cookie.split(";")[0].split("=")[1]}
                                            ).headers.get("set-cookie", "")  # kept, not replaced


def test_page_scripts_cannot_read_the_identity(app, app_browser):
    context = app_browser.new_context()
    page = context.new_page()
    page.goto(app.url)
    page.locator("#chat-input textarea:not([disabled])").wait_for()
    assert "mipha-visitor" not in page.evaluate("() => document.cookie")
    assert page.evaluate("() => Object.keys(localStorage).filter(k => k.includes('mipha'))") == []
    assert any(c["name"] == "mipha-visitor" and c["httpOnly"] for c in context.cookies())
    context.close()


def test_another_browser_cannot_use_a_session_hash_it_learnt(app):
    session = secrets.token_hex(6)
    with closing(visitor(app.url)) as owner, closing(visitor(app.url)) as stranger:
        config = owner.get("config").json()
        listing = dependency(config, elem_id="search-box", event="change")
        assert run_event(owner, listing, ["", None], session_hash=session).get("success") is True

        replayed = run_event(stranger, listing, ["", None], session_hash=session)
        assert replayed["msg"] == "refused" and replayed["status_code"] == 403
        assert "another browser" in replayed["body"] and "Traceback" not in replayed["body"]
        listened = next(queue_messages(stranger, session_hash=session, timeout=10))
        assert listened == {"msg": "refused", "status_code": 403}
        cancel = stranger.post("gradio_api/cancel", json={"session_hash": session, "fn_index": listing.fn_index,
                                                          "event_id": "x"})
        assert cancel.status_code == 403
        assert stranger.get(f"gradio_api/heartbeat/{session}").status_code == 403
        stop = dependency(config, elem_id="stop-button", event="click")  # an unqueued event: /run/predict
        unqueued = stranger.post("gradio_api/run/predict", json={"data": [None], "fn_index": stop.fn_index,
                                                                 "session_hash": session})
        assert unqueued.status_code == 403

        assert run_event(owner, listing, ["", None], session_hash=session).get("success") is True  # still theirs

