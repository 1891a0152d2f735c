"""Another Mipha Chat process, with its `/v1` API on, as the model of this one (`--engine-url`).

Two real processes on the tiny model: the model server (`--api-key`) and the app in front of it
(`--engine-url`). The engine is checked on its own (the same greedy reply as the local engine,
Stop reaching the server, failures as sentences), the handlers turn its failures into notices,
and a browser asks about a photo on the front app and stops the remote reply.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect

import storage as db
from app.handlers import Handlers
from app.model_slot import ModelSlot
from mipha_core import RemoteEngineError, RemoteServer, StoredPhoto, load_engine, load_remote_engine
from tests.app_process import RunningApp, free_port, running_app
from tests.browser_support import open_app, screenshot, set_max_new_tokens, started_together, visitor

ASSETS = Path(__file__).resolve().parent.parent / "assets"
KEY = "model-server-key-0123456789"


@dataclass(frozen=True)
class Pair:
    model_server: RunningApp
    front: RunningApp

    @property
    def api_url(self) -> str:
        return f"{self.model_server.url}v1"


LONGEST_REPLY = 2048
"""The servers' reply limit; after a photo the context leaves room for about 1270 tokens, which the
tiny model writes in 2-3 s on a fast CPU (512 took 1 s, over before Stop could land)."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[Pair]:
    server_dir, front_dir = tmp_path_factory.mktemp("model-server"), tmp_path_factory.mktemp("front")
    port = free_port()
    server = running_app(server_dir, "--api-key", KEY, env={"MIPHA_MAX_NEW_TOKENS": str(LONGEST_REPLY)}, port=port,
                         name="model-server")
    front = running_app(front_dir, "--engine-url", f"http://127.0.0.1:{port}/v1", env={
        "MIPHA_ENGINE_API_KEY": KEY, "MIPHA_MAX_NEW_TOKENS": str(LONGEST_REPLY)}, name="front-server")
    with started_together(server, front) as (model_server, front_app):
        yield Pair(model_server, front_app)


@pytest.fixture(scope="module")
def remote(pair, tmp_path_factory):
    return load_remote_engine(RemoteServer(url=pair.api_url, api_key=KEY), model="tiny",
                              data_dir=tmp_path_factory.mktemp("remote-tokenizer"))


def photo_question(text: str = "What is in this photo?") -> list[dict]:
    image = Image.open(ASSETS / "chelsea.jpg")
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def api_replies(server: RunningApp) -> list[tuple[str, int]]:
    """(how it ended, tokens) of each API reply the model server has logged."""
    return [(m[1], int(m[2])) for m in re.finditer(r"API reply (api-\w+): (\w+) after (\d+) tokens",
                                                    server.log.read_text())
            for m in [(m.group(1), m.group(2), m.group(3))]]


def wait_for(condition, *, timeout: float = 30.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


# --- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_like_engine(tmp_path_factory):
    """The tiny model loaded in this process as the model server loads it (`auto`: llama.cpp on the CPU)."""
    engine = load_engine("tiny", device="cpu", data_dir=tmp_path_factory.mktemp("server-like"))
    yield engine
    engine.close()


def test_the_remote_engine_gives_the_local_engines_greedy_reply(remote, server_like_engine):
    """The front pads and resizes the photo itself: the server sees the same pixels, so the reply
    matches the one the same engine gives in this process."""
    direct = server_like_engine.stream(photo_question(), max_new_tokens=24, temperature=0).text()
    reply = remote.stream(photo_question(), max_new_tokens=24, temperature=0)
    assert reply.text() == direct
    assert reply.stats.finish_reason == "length" and reply.stats.completion_tokens == 24
    assert reply.stats.prompt_tokens == server_like_engine.prepare(photo_question(), max_new_tokens=24).prompt_tokens


def test_a_stored_photo_is_decoded_when_the_reply_is_read(remote):
    opened = []

    def open_photo() -> Image.Image:
        opened.append(1)
        return Image.open(ASSETS / "chelsea.jpg")

    question = photo_question()
    question[0]["content"][0]["image"] = StoredPhoto(key="c" * 64, open=open_photo)
    reply = remote.stream(question, max_new_tokens=8, temperature=0)
    assert opened == []  # asking only fits the conversation
    assert reply.text() == remote.stream(photo_question(), max_new_tokens=8, temperature=0).text()
    assert opened == [1]


def test_stop_ends_the_generation_on_the_server(pair, remote):
    before = len(api_replies(pair.model_server))
    cancel = threading.Event()
    reply = remote.stream(photo_question("Tell me everything"), max_new_tokens=1000, temperature=0.8, cancel=cancel)
    for number, _ in enumerate(reply, start=1):
        if number == 3:
            cancel.set()
    assert reply.stats.finish_reason == "cancelled"
    wait_for(lambda: len(api_replies(pair.model_server)) > before, what="the server logging the reply's end")
    reason, tokens = api_replies(pair.model_server)[-1]
    assert reason == "cancelled" and tokens < 1000


@pytest.mark.parametrize(("server", "sentence"), [
    (RemoteServer(url=f"http://127.0.0.1:{free_port()}/v1", api_key=KEY), "could not reach the model server"),
    (None, "refused this app's key"),
    ("wrong-model", "has no model"),
])
def test_failures_are_sentences_that_say_what_to_check(pair, tmp_path, server, sentence):
    if server is None:
        server = RemoteServer(url=pair.api_url, api_key="wrong-key-0123456789abc")
    elif server == "wrong-model":
        server = RemoteServer(url=pair.api_url, api_key=KEY, model="llama-70b")
    engine = load_remote_engine(server, model="tiny", data_dir=tmp_path)
    with pytest.raises(RemoteEngineError, match=sentence) as failure:
        engine.stream(photo_question(), max_new_tokens=4).text()
    assert "Traceback" not in str(failure.value) and "Error(" not in str(failure.value)


def test_an_unreachable_server_is_a_notice_and_the_question_stays(app_services, tmp_path):
    engine = load_remote_engine(RemoteServer(url=f"http://127.0.0.1:{free_port()}/v1"), model="tiny",
                                data_dir=tmp_path)
    h = Handlers(replace(app_services, model=ModelSlot.ready(engine)))
    owner = h.owner(secrets.token_urlsafe(32), username=None, oauth_username=None)
    sent = h.send(owner, {"text": "Anyone there?", "files": []}, None, None, 0.0, 1.0, 16)
    final = list(h.attach(owner, sent.conversation_id, new_reply=True))[-1]
    assert "could not reach the model server" in final.notice.text
    assert final.busy is False
    with h.storage.session() as s:
        question, reply = db.list_messages(s, owner_id=owner, conversation_id=sent.conversation_id)
    assert question.text == "Anyone there?" and reply.status is db.MessageStatus.ERROR


# --- the page in front of the model server -------------------------------------------------


@pytest.mark.browser
def test_a_photo_question_streams_from_the_model_server_and_stop_stops_it(pair, app_browser):
    before = len(api_replies(pair.model_server))
    with visitor(app_browser) as context:
        page = open_app(context, pair.front.url)
        set_max_new_tokens(page, LONGEST_REPLY)  # as long as the context allows
        page.locator("#chat-input input[type=file]").set_input_files(str(ASSETS / "chelsea.jpg"))
        page.locator("#chat-input textarea").fill("What is in this photo?")
        page.locator("#send-button").click()
        reply = page.locator("#chatbot [data-testid=bot]").last
        expect(reply).to_contain_text(re.compile(r"\w{3}"))
        expect(page.locator("#stop-button")).to_be_enabled()
        first = len(reply.inner_text())
        wait_for(lambda: len(reply.inner_text()) > first + 5, what="the reply growing")
        page.locator("#stop-button").click()  # at once: on a fast CPU the tiny model writes the reply in seconds
        expect(page.locator("#chatbot .reply-footer").last).to_contain_text("stopped")
        expect(page.locator("#send-button")).to_be_enabled()
        assert page.locator("#chatbot [data-testid=user] img").count() == 1
        screenshot(page, "remote-engine-stopped")
    wait_for(lambda: len(api_replies(pair.model_server)) > before, what="the model server ending the reply")
    reason, tokens = api_replies(pair.model_server)[-1]
    assert reason == "cancelled" and tokens < LONGEST_REPLY, "Stop on the page did not stop the model server"
