"""Only the app's own page may make credentialed requests: other origins, other localhost
ports included, get no CORS grant and cannot change anything.

Against the real server (`launch.py --model tiny --auth alice:pw`) over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.app_process import RunningApp, running_app

CORS_GRANTS = ("access-control-allow-origin", "access-control-allow-credentials")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    with running_app(tmp_path_factory.mktemp("origin-data"), "--auth", "alice:pw", name="http-origin") as app:
        yield app


@pytest.fixture(scope="module")
def alice(server: RunningApp) -> Iterator[httpx.Client]:
    """A client holding alice's login cookie."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/login", data={"username": "alice", "password": "pw"})
        assert response.status_code == 200, response.text
        yield client


def foreign_origins(server: RunningApp) -> list[str]:
    port = urlsplit(server.url).port
    return [f"http://localhost:{port + 1}", f"http://127.0.0.1:{port + 1}", "http://localhost:9999",
            "http://evil.example", f"http://evil.example:{port}", "null"]


def own_origin(server: RunningApp) -> str:
    return server.url.rstrip("/")


def assert_no_cors_grant(response: httpx.Response) -> None:
    granted = {name: response.headers[name] for name in CORS_GRANTS if name in response.headers}
    assert not granted, f"{response.request.method} {response.request.url} granted {granted}"


def test_foreign_origins_cannot_read_a_signed_in_users_data(server, alice):
    for origin in foreign_origins(server):
        for path in ("/config", "/gradio_api/user", "/gradio_api/token", "/"):
            response = alice.get(path, headers={"Origin": origin})
            assert response.status_code == 403, (origin, path, response.status_code)
            assert_no_cors_grant(response)
            assert response.text.strip() == "Requests from other websites are not allowed."


def test_preflights_from_foreign_origins_are_refused(server, alice):
    for origin in foreign_origins(server):
        response = alice.options("/gradio_api/queue/join", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert response.status_code == 403, origin
        assert_no_cors_grant(response)
        assert "access-control-allow-methods" not in response.headers


def test_state_changing_requests_from_foreign_origins_are_refused(server, alice):
    for origin in foreign_origins(server):
        for path, body in (("/gradio_api/cancel", {"session_hash": "x", "fn_index": 0, "event_id": "y"}),
                           ("/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "x"})):
            response = alice.post(path, json=body, headers={"Origin": origin})
            assert response.status_code == 403, (origin, path)
            assert_no_cors_grant(response)
        login = httpx.post(f"{server.url}login", data={"username": "alice", "password": "pw"},
                           headers={"Origin": origin})
        assert login.status_code == 403 and "set-cookie" not in login.headers


def test_the_apps_own_origin_still_works_without_cors_headers(server, alice):
    origin = own_origin(server)
    config = alice.get("/config", headers={"Origin": origin})
    assert config.status_code == 200 and "components" in config.json()
    assert_no_cors_grant(config)
    cancel = alice.post("/gradio_api/cancel", json={"session_hash": "x", "fn_index": 0, "event_id": "y"},
                        headers={"Origin": origin})
    assert cancel.status_code == 200
    assert_no_cors_grant(cancel)


def test_a_local_server_answers_only_to_loopback_host_names(server, alice):
    """DNS rebinding: a page at http://evil.example:PORT resolving to 127.0.0.1 is same-origin to itself."""
    port = urlsplit(server.url).port
    for host in (f"evil.example:{port}", "rebind.example"):
        response = alice.get("/config", headers={"Host": host, "Origin": f"http://{host}"})
        assert response.status_code == 421, host
        assert_no_cors_grant(response)
    assert alice.get("/config", headers={"Host": f"localhost:{port}"}).status_code == 200


@pytest.mark.browser
def test_signing_in_through_the_page_works_under_the_policy(server, app_browser):
    context = app_browser.new_context()
    context.set_default_timeout(60_000)
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text))
    page.goto(server.url)
    page.locator("input[type=password]").fill("pw")
    page.locator("input[type=text]").fill("alice")
    page.keyboard.press("Enter")
    page.locator("#chat-input textarea:not([disabled])").wait_for()
    context.close()
    assert not [m for m in messages if "Content Security Policy" in m or "Refused to" in m]
