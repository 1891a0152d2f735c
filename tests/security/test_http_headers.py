"""Security headers on every response, a CSP that forbids remote images and scripts, and no
public API pages or monitoring dashboard. The page still works in Chromium under the policy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.web.headers import add_nonce, content_security_policy
from tests.app_process import RunningApp, running_app
from tests.browser_support import poll

ASSETS = Path(__file__).resolve().parents[2] / "assets"
HIDDEN = ["/monitoring", "/monitoring/summary", "/gradio_api/info", "/gradio_api/openapi.json", "/openapi.json",
          "/docs", "/gradio_api/runs", "/gradio_api/deep_link?session_hash=x", "/gradio_api/proxy=https://x.hf.space/"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    with running_app(tmp_path_factory.mktemp("headers-data"), name="http-headers") as app:
        yield app


def directives(csp: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (d.split() for d in csp.split(";") if d.strip())}


def assert_secured(response: httpx.Response) -> dict[str, list[str]]:
    headers = response.headers
    assert headers["x-content-type-options"] == "nosniff", response.url
    assert headers["referrer-policy"] == "no-referrer", response.url
    assert headers["x-frame-options"] == "SAMEORIGIN", response.url
    policy = directives(headers["content-security-policy"])
    assert policy["frame-ancestors"] == ["'self'"]
    assert policy["img-src"] == ["'self'", "data:", "blob:"]
    assert policy["script-src"][0] == "'self'" and all(s.startswith("'nonce-") for s in policy["script-src"][1:])
    assert policy["object-src"] == ["'none'"] and policy["connect-src"] == ["'self'"]
    return policy


def test_every_response_carries_the_security_headers(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in ("/", "/theme.css", "/favicon.ico", "/no-such-page", *HIDDEN):
            assert_secured(client.get(path))
        with client.stream("GET", "/gradio_api/heartbeat/x") as events:  # a stream that never ends
            assert_secured(events)
        assert_secured(client.post("/gradio_api/cancel", json={"session_hash": "x", "fn_index": 0, "event_id": "y"}))


def test_the_page_gets_a_fresh_nonce_on_every_script_tag(server):
    nonces = set()
    for _ in range(2):
        response = httpx.get(server.url, headers={"Accept-Encoding": "br, gzip"}, timeout=30)
        (nonce,) = [s[len("'nonce-"):-1] for s in assert_secured(response)["script-src"][1:]]
        tags = re.findall(r"<script\b[^>]*>", response.text)
        assert tags and all(f'nonce="{nonce}"' in tag for tag in tags)
        nonces.add(nonce)
    assert len(nonces) == 2


def test_api_pages_and_monitoring_are_not_public(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in HIDDEN:
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.text.strip() == "Not found."
        page = client.get("/").text
    config = json.loads(re.search(r"window\.gradio_config = (\{.*?\});</script>", page).group(1))
    assert "api" not in config["footer_links"]


def test_served_files_are_sandboxed(server):
    response = httpx.get(f"{server.url}gradio_api/file={ASSETS / 'chelsea.jpg'}", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "sandbox" in directives(response.headers["content-security-policy"])


def test_a_space_may_be_framed_by_hugging_face_only():
    policy = directives(content_security_policy(on_space=True))
    assert policy["frame-ancestors"] == ["'self'", "https://huggingface.co", "https://*.hf.space"]


def test_share_pages_use_the_bundled_frontend_instead_of_s3():
    import gradio

    share_page = (Path(gradio.__file__).parent / "templates/frontend/share.html").read_bytes()
    assert b"amazonaws.com" in share_page  # what gradio serves behind --share
    page = add_nonce(share_page, "n0nce")
    assert b"amazonaws.com" not in page
    assert re.search(rb'<script nonce="n0nce" type="module" crossorigin src="\./assets/index-[\w-]+\.js">', page)


@pytest.mark.browser
def test_the_page_runs_under_the_policy_without_violations(server, app_browser):
    context = app_browser.new_context()
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text))
    page.goto(server.url)
    page.locator("#chat-input textarea:not([disabled])").wait_for(timeout=60_000)
    page.locator(".gallery-item, [data-testid=example] , button:has(img)").first.wait_for(timeout=30_000)
    poll(page, "() => [...document.images].some(img => img.src.includes('chelsea') "
               "&& img.complete && img.naturalWidth > 0)", timeout=30, message="the example photo shown")
    context.close()
    violations = [m for m in messages if "Content Security Policy" in m or "Refused to" in m]
    assert not violations, violations
