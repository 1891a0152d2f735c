"""What `/gradio_api/file=` serves: never the data dir (browser key, database, photo files
themselves), never a photo whose conversation was deleted, nothing from before a restart,
and no original upload once its photo is stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urljoin

import httpx
import pytest

from app.web.files import file_refusal_reason, prepare_temp_dir, sweep
from tests.app_process import REPO, RunningApp, running_app
from tests.browser_support import poll

ASSETS = REPO / "assets"
KEY_FILE = "mipha.sqlite3"  # the database: every conversation
FAST_REPLIES = {"MIPHA_MAX_NEW_TOKENS": "32"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    with running_app(tmp_path_factory.mktemp("files-data"), name="http-files") as app:
        yield app


def file_url(app: RunningApp, path: str) -> str:
    return f"{app.url}gradio_api/file={path}"


def test_the_database_is_never_served(server):
    key = (server.data_dir / KEY_FILE).resolve()
    assert key.is_file()
    images, temp = server.data_dir.resolve() / "images", server.data_dir.resolve() / "tmp" / "gradio"
    variants = [str(key), f"{images}/../{KEY_FILE}", f"{temp}/../../{KEY_FILE}", f"{images}/./../{KEY_FILE}",
                os.path.relpath(key, REPO), f"{temp}/../../{KEY_FILE}".replace("/", "//")]
    with httpx.Client(timeout=30) as client:
        for variant in variants:
            for url in (file_url(server, variant), file_url(server, quote(variant, safe="")),
                        f"{server.url}gradio_api/file/{variant}", file_url(server, variant.replace("..", "%2e%2e"))):
                response = client.get(url)
                assert 400 <= response.status_code < 500, url
                assert key.read_text() not in response.text


def test_nothing_else_under_the_data_dir_is_served(server):
    data = server.data_dir.resolve()
    database = next(data.glob("*.sqlite3"))
    with httpx.Client(timeout=30) as client:
        for path in (database, data / "http-files.log", data / "images"):
            response = client.get(file_url(server, str(path)))
            assert response.status_code == 404 and response.text.strip() == "This file is not available."


def send_photo(page, photo: Path) -> tuple[str, str]:
    """Attach and send `photo`; the path the upload returned and the URL the chat shows it at."""
    with page.expect_response(lambda r: "/gradio_api/upload" in r.url) as uploaded:
        page.locator("#chat-input input[type=file]").set_input_files(str(photo))
    (upload_path,) = uploaded.value.json()
    page.locator("#chat-input textarea").fill("What is in this photo?")
    page.locator("#send-button").click()
    page.locator("#chatbot .reply-footer").last.wait_for()
    shown = page.locator("#chatbot [data-testid=user] img").last.get_attribute("src")
    return upload_path, urljoin(page.url, shown)


NO_QUESTION_SHOWN = "() => !document.querySelector('#chatbot [data-testid=user]')"


def new_chat(page) -> None:
    page.locator("#new-chat-button").click()
    poll(page, NO_QUESTION_SHOWN, message="an empty chat")


def delete_open_conversation(page) -> None:
    page.locator("#manage-conversation").get_by_text("This conversation").click()
    page.locator("#delete-button").click()
    page.locator("#confirm-delete").click()
    poll(page, NO_QUESTION_SHOWN, message="the conversation gone from the chat")


def open_page(context, url: str):
    page = context.new_page()
    page.goto(url)
    page.locator("#chat-input textarea:not([disabled])").wait_for()
    return page


@pytest.mark.browser
def test_deleted_photos_and_files_from_before_a_restart_are_not_served(tmp_path, app_browser):
    context = app_browser.new_context()
    context.set_default_timeout(60_000)
    with running_app(tmp_path, env=FAST_REPLIES, name="http-files-restart") as app:
        page = open_page(context, app.url)
        deleted_upload, deleted_shown = send_photo(page, ASSETS / "chelsea.jpg")
        assert httpx.get(deleted_shown).status_code == 200
        delete_open_conversation(page)
        new_chat(page)
        kept_upload, kept_shown = send_photo(page, ASSETS / "coffee.jpg")
        with page.expect_response(lambda r: "/gradio_api/upload" in r.url) as pending:
            page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / "rocket.jpg"))
        (pending_upload,) = pending.value.json()

        assert httpx.get(deleted_shown).status_code == 404  # the cached copy went with the conversation
        for original in (deleted_upload, kept_upload):  # originals (EXIF, GPS) go once the photo is stored
            assert not Path(original).exists() and httpx.get(file_url(app, original)).status_code in (403, 404)
        assert httpx.get(kept_shown).status_code == 200
        assert httpx.get(file_url(app, pending_upload)).status_code == 200
        page.close()

    with running_app(tmp_path, env=FAST_REPLIES, name="http-files-restart") as app:
        for before in (file_url(app, pending_upload), kept_shown.replace(kept_shown.split("/gradio_api")[0],
                                                                         app.url.rstrip("/"))):
            assert httpx.get(before).status_code in (403, 404), before
        assert not any((tmp_path / "tmp" / "gradio").rglob("*.jpg"))
        page = open_page(context, app.url)  # the kept conversation still shows its photo
        page.locator("#conversation-list label").first.click()
        poll(page, "() => [...document.querySelectorAll('#chatbot img')].some("
                   "img => img.complete && img.naturalWidth > 0)", message="the kept photo shown")
    context.close()


def test_the_temp_dir_is_emptied_at_start_and_swept_of_old_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", "unchanged")
    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", "unchanged")
    temp = tmp_path / "tmp" / "gradio"
    (temp / "old-run").mkdir(parents=True)
    (temp / "old-run" / "photo.jpg").write_bytes(b"x")
    assert prepare_temp_dir(temp) == temp.resolve() and not any(temp.iterdir())
    assert os.environ["GRADIO_TEMP_DIR"] == str(temp.resolve())

    for name, age in (("old", 7200), ("new", 60), ("kept", 7200)):
        (temp / name).mkdir()
        (temp / name / "f.jpg").write_bytes(b"x")
        for path in (temp / name / "f.jpg", temp / name):
            os.utime(path, (time.time() - age, time.time() - age))
    assert sweep(temp, max_age_s=3600, keep={temp / "kept" / "f.jpg"}) == 1
    assert sorted(p.relative_to(temp).as_posix() for p in temp.rglob("*")) == [
        "kept", "kept/f.jpg", "new", "new/f.jpg"]


def test_a_cached_copy_of_a_deleted_photo_is_removed_when_asked_for(tmp_path):
    temp = tmp_path / "tmp" / "gradio"
    sha = "ab" * 32
    copy = temp / "somehash" / f"{sha}.jpg"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"x")
    kwargs = {"data_dir": tmp_path.resolve(), "temp_dir": temp.resolve()}
    assert file_refusal_reason(str(copy), photo_exists=lambda s: True, **kwargs) is None
    assert file_refusal_reason(str(copy), photo_exists=lambda s: s != sha, **kwargs) == "deleted photo"
    assert not copy.exists()
    assert file_refusal_reason("/etc/passwd\0", photo_exists=lambda s: True, **kwargs) == "unreadable path"
