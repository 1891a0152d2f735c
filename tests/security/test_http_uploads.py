"""Uploads are bounded: one photo per request, a size cap read from the body itself, and per
visitor a rate and an hourly volume, refused early with one sentence.

Against the real server with small limits; each test signs in as its own user, since the
limits are counted per signed-in user (per client address for anonymous visitors).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest

from app.web.uploads import MAX_VISITORS, UploadBudget
from tests.app_process import RunningApp, running_app

MB = 1024 * 1024
USERS = ("parts", "size", "chunked", "rate", "volume", "fine")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    auth = [arg for user in USERS for arg in ("--auth", f"{user}:pw")]
    with running_app(tmp_path_factory.mktemp("upload-data"), *auth, "--max-upload-mb", "1",
                     "--uploads-per-minute", "4", "--upload-mb-per-hour", "3", name="http-uploads") as app:
        yield app


@contextmanager
def signed_in(server: RunningApp, user: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/login", data={"username": user, "password": "pw"}).status_code == 200
        yield client


def upload(client: httpx.Client, *files: bytes) -> httpx.Response:
    return client.post("/gradio_api/upload", files=[("files", (f"p{i}.jpg", f, "image/jpeg"))
                                                    for i, f in enumerate(files)])


def read_response(sock: socket.socket) -> str:
    """Status line, headers and the (short, Content-Length framed) body of one response."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    (length,) = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    while len(body) < length:
        body += sock.recv(4096)
    return (head + b"\r\n\r\n" + body).decode()


def temp_files(server: RunningApp) -> set[str]:
    return {p.name for p in (server.data_dir / "tmp" / "gradio").rglob("*") if p.is_file()}


def test_one_photo_per_request(server):
    before = temp_files(server)
    with signed_in(server, "parts") as client:
        response = upload(client, b"a" * 1000, b"b" * 1000)
        assert (response.status_code, response.text.strip()) == (413, "Send one photo per upload.")
        assert temp_files(server) == before  # refused before anything reached the disk
        assert upload(client, b"c" * 1000).status_code == 200


def test_a_claimed_size_over_the_limit_is_refused_before_the_body(server):
    with signed_in(server, "size") as client:
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(b"POST /gradio_api/upload HTTP/1.1\r\nHost: " + address.netloc.encode() +
                     b"\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 999999999\r\n"
                     b"Cookie: " + cookie.encode() + b"\r\n\r\n")
        answer = read_response(sock)
    assert answer.startswith("HTTP/1.1 413")
    assert answer.rstrip().endswith("The photo is larger than the 1 MB limit; use a smaller one.")


def test_a_body_without_a_length_is_cut_at_the_limit(server):
    boundary = b"b0undary"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="big.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + b"x" * (MB + 200_000) + b"\r\n--" + boundary + b"--\r\n")

    def chunks():  # no Content-Length: the cap must come from counting
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    before = temp_files(server)
    with signed_in(server, "chunked") as client:
        response = client.post("/gradio_api/upload", content=chunks(),
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"})
    assert response.status_code == 413
    assert "big.jpg" not in temp_files(server) - before


def test_uploads_per_minute_per_visitor(server):
    with signed_in(server, "rate") as client:
        statuses = [upload(client, b"r" * 100) for _ in range(5)]
        with signed_in(server, "fine") as other:
            assert upload(other, b"f" * 100).status_code == 200  # another visitor is not held back
    assert [r.status_code for r in statuses] == [200, 200, 200, 200, 429]
    assert statuses[-1].text.strip() == "Too many uploads in a minute; wait a moment and try again."
    assert statuses[-1].headers["retry-after"] == "60"


def test_upload_volume_per_hour_per_visitor(server):
    with signed_in(server, "volume") as client:
        statuses = [upload(client, b"v" * 900_000).status_code for _ in range(4)]
        refused = upload(client, b"v" * 100)  # the rate limit answers first from now on
    assert statuses == [200, 200, 200, 429]
    assert refused.status_code == 429


def test_budget_windows_slide():
    now = [0.0]
    budget = UploadBudget(per_minute=2, bytes_per_hour=1000, total_bytes_per_hour=1500, clock=lambda: now[0])
    assert budget.start("a") is None and budget.start("a") is None
    assert budget.start("a").status == 429
    now[0] = 61
    assert budget.start("a") is None
    budget.spend("a", 800)
    budget.spend("b", 600)
    assert budget.bytes_left("a") == (200, 100)
    now[0] = 61 + 3600
    assert budget.bytes_left("a") == (1000, 1500)


def test_budget_forgets_the_least_recent_visitors_first():
    budget = UploadBudget(per_minute=1, bytes_per_hour=10, total_bytes_per_hour=10**9)
    budget.start("first")
    for i in range(MAX_VISITORS):
        budget.start(f"v{i}")
    assert budget.start("first") is None  # forgotten, so counted afresh
