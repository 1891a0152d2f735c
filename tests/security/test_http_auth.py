"""With `--auth`, every route that reads or changes data needs the login cookie.

The routes are enumerated from the launched app itself (launched in this process the way
`launch.py` launches it), so a route added by a Gradio upgrade is checked too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

import launch
from app.settings import Credential
from app.web import stored_photo_lookup
from tests.app_process import free_port

ASSETS = Path(__file__).resolve().parents[2] / "assets"
# What the login page loads before anyone signs in, and launch()'s own startup call.
PUBLIC = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/manifest.json", "/robots.txt",
          "/pwa_icon", "/pwa_icon/{size}", "/assets/{path}", "/static/{path}", "/svelte/{path}",
          "/gradio_api/startup-events"}
PARAMETER = re.compile(r"\{[^}]+\}")
CONVERTER = re.compile(r"\{(\w+):\w+\}")  # `{path:path}` as the schema writes it: `{path}`


@pytest.fixture(scope="module")
def launched(tmp_path_factory, app_tiny_engine) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """The app with `--auth alice:pw`: its URL and every (method, path) it routes."""
    from app.model_slot import ModelSlot
    from app.services import Services
    from app.settings import Settings
    from app.share_page import share_routes
    from app.ui import build_app
    from storage import StorageConfig, open_storage

    data_dir = tmp_path_factory.mktemp("auth-data")
    settings = Settings(model="tiny", data_dir=data_dir, port=free_port(), auth=(Credential("alice", "pw"),))
    storage = open_storage(StorageConfig(data_dir=data_dir))
    services = Services(settings=settings, storage=storage, model=ModelSlot.ready(app_tiny_engine))
    demo = build_app(services)
    app, url, _ = demo.launch(prevent_thread_lock=True, **launch.launch_options(
        settings, photo_exists=stored_photo_lookup(storage), routes=share_routes(storage)))
    routes = [(method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations]
    for route in app.routes:  # routes outside the schema too, such as the share pages
        path = CONVERTER.sub(r"{\1}", route.path) if isinstance(route, Route) else None
        routes += [(method, path) for method in sorted(getattr(route, "methods", None) or ())
                   if path is not None and (method, path) not in routes]
    try:
        yield url, routes
    finally:
        demo.close()
        services.replies.close()
        storage.close()


def concrete(path: str) -> str:
    """A requestable URL path for a route pattern (`/file={path_or_url}` names a real file)."""
    if "{path_or_url}" in path or path.endswith("/file/{path}"):
        return PARAMETER.sub(str(ASSETS / "chelsea.jpg"), path)
    return PARAMETER.sub("x", path)


def test_there_are_routes_to_check(launched):
    _, routes = launched
    assert ("POST", "/gradio_api/cancel") in routes and ("POST", "/gradio_api/upload") in routes
    assert ("GET", "/share/{token}") in routes and ("GET", "/share/{token}/photo/{sha256}") in routes
    assert len([path for _, path in routes if path.startswith("/gradio_api/")]) > 30


def test_every_route_but_the_login_pages_refuses_a_visitor_without_login(launched):
    url, routes = launched
    opened = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path in routes:
            if path in PUBLIC:
                continue
            response = client.request(method, concrete(path), json={} if method == "POST" else None)
            sentence = method == "HEAD" or response.text.strip() in ("Sign in first.", "Not found.")
            if response.status_code not in (401, 404) or not sentence:
                opened.append(f"{method} {path}: {response.status_code} {response.text[:80]!r}")
    assert not opened, "\n".join(opened)


def test_cancel_and_upload_need_the_login(launched):
    url, _ = launched
    with httpx.Client(base_url=url, timeout=30) as client:
        cancel = client.post("/gradio_api/cancel", json={"session_hash": "x", "fn_index": 0, "event_id": "y"})
        assert cancel.status_code == 401
        upload = client.post("/gradio_api/upload", files={"files": ("a.jpg", b"not really", "image/jpeg")})
        assert upload.status_code == 401


def test_signed_in_requests_work_and_stop_after_logout(launched):
    url, _ = launched
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        assert client.post("/login", data={"username": "alice", "password": "pw"}).status_code == 200
        assert client.get("/gradio_api/user").json() == "alice"
        assert "components" in client.get("/config").json()
        cancel = client.post("/gradio_api/cancel", json={"session_hash": "x", "fn_index": 0, "event_id": "y"})
        assert cancel.status_code == 200
        photo = (ASSETS / "chelsea.jpg").read_bytes()
        (uploaded,) = client.post("/gradio_api/upload", files={"files": ("cat.jpg", photo, "image/jpeg")}).json()
        assert client.get(f"/gradio_api/file={uploaded}").content == photo
        client.get("/logout")
        assert client.get("/config").status_code == 401


def test_the_login_page_itself_loads_without_login(launched):
    url, _ = launched
    with httpx.Client(base_url=url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
        for asset in re.findall(r'(?:src|href)="\./(assets/[^"]+)"', page.text):
            assert client.get(f"/{asset}").status_code == 200, asset
