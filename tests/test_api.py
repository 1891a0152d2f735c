"""The OpenAI-compatible `/v1` API, called with the official `openai` client against the real server.

The app is launched in this process the way `launch.py` launches it (guard, routes, queue), with
`--auth` on as well, so the API's keys are shown to work where the page needs a login.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from PIL import Image

import launch
from app.api import api_routes
from app.settings import ApiKey, Credential, Settings
from app.web import stored_photo_lookup
from tests.app_process import free_port

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "second-key-0123456789abcdef"


def photo_uri(size=(640, 480), color=(200, 30, 30), fmt="JPEG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def photo_question(text: str = "What is in this photo?", uri: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri or photo_uri()}},
                                         {"type": "text", "text": text}]}]


class Launched:
    def __init__(self, url: str, services) -> None:
        self.url = url
        self.services = services
        self.client = openai.OpenAI(base_url=f"{url}v1", api_key=KEY, max_retries=0, timeout=60)


@contextmanager
def launched(settings, engine) -> Iterator[Launched]:
    """The app launched in this process as `launch.py` launches it, on a real SQLite file."""
    from app.model_slot import ModelSlot
    from app.services import Services
    from app.ui import build_app
    from storage import StorageConfig, open_storage

    storage = open_storage(StorageConfig(data_dir=settings.data_dir))
    services = Services(settings=settings, storage=storage, model=ModelSlot.ready(engine))
    demo = build_app(services)
    _, url, _ = demo.launch(prevent_thread_lock=True, **launch.launch_options(
        settings, photo_exists=stored_photo_lookup(storage), routes=api_routes(services)))
    try:
        yield Launched(url, services)
    finally:
        demo.close()
        services.replies.close()
        storage.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory, app_tiny_engine) -> Iterator[Launched]:
    settings = Settings(model="tiny", data_dir=tmp_path_factory.mktemp("api-data"), port=free_port(),
                        auth=(Credential("alice", "pw"),),
                        api_keys=(ApiKey(KEY, label="key 1"), ApiKey(OTHER_KEY, label="key 2")),
                        max_new_tokens=1024, api_queue=1, max_upload_mb=1)
    with launched(settings, app_tiny_engine) as app:
        yield app


def wait_idle(services, timeout: float = 30) -> None:
    """Until no reply job runs (a previous test's stopped stream may still be winding down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(not job.done for job in list(services.replies._jobs.values())):
            return
        time.sleep(0.05)
    raise AssertionError("a reply job is still running")


# --- what a client can do -------------------------------------------------------------------


def test_models_lists_the_one_served_model(api):
    assert [model.id for model in api.client.models.list()] == ["mipha-tiny"]


def test_a_photo_question_gets_the_same_greedy_reply_as_the_engine(api, app_tiny_engine):
    """One path: the API's photo decoding, prompt and fitting give exactly the engine's reply."""
    uri = photo_uri()
    reply = api.client.chat.completions.create(model="mipha-tiny", messages=photo_question(uri=uri),
                                               max_tokens=24, temperature=0)
    from mipha_core import load_image

    image = load_image(base64.b64decode(uri.split(",", 1)[1]))
    direct = app_tiny_engine.stream([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "What is in this photo?"}]}],
        max_new_tokens=24, temperature=0).text()
    assert reply.choices[0].message.content == direct
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 24
    assert reply.usage.prompt_tokens > app_tiny_engine.image_tokens  # the photo's positions are counted
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24


def test_a_streamed_reply_comes_in_chunks_with_usage_and_ends_with_done(api):
    with httpx.stream("POST", f"{api.url}v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "mipha-tiny", "messages": [{"role": "user", "content": "Hello"}],
                            "max_tokens": 16, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    stream = api.client.chat.completions.create(model="mipha-tiny", messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 2, "the reply came in one piece, not streamed"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    whole = api.client.chat.completions.create(model="mipha-tiny", messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=16, temperature=0)
    assert "".join(texts) == whole.choices[0].message.content


def test_max_completion_tokens_bounds_the_reply_and_the_server_cap_bounds_both(api):
    short = api.client.chat.completions.create(model="mipha-tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_completion_tokens=5, temperature=0)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"


def test_a_stop_sequence_ends_the_reply_before_it(api):
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = api.client.chat.completions.create(model="mipha-tiny", messages=messages, max_tokens=40,
                                              temperature=0).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = api.client.chat.completions.create(model="mipha-tiny", messages=messages, max_tokens=40, temperature=0,
                                             stop=[stop, "never appears \u2603"])
    assert cut.choices[0].message.content == full[:full.index(stop)].lstrip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = api.client.chat.completions.create(model="mipha-tiny", messages=messages, max_tokens=40,
                                                  temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        cut.choices[0].message.content


def test_a_seed_repeats_a_sampled_reply(api):
    def sampled(seed: int) -> str:
        return api.client.chat.completions.create(
            model="mipha-tiny", messages=[{"role": "user", "content": "Say something"}], max_tokens=30,
            temperature=1.5, top_p=1.0, seed=seed).choices[0].message.content

    first = sampled(7)
    assert sampled(7) == first
    assert sampled(8) != first


def test_a_client_system_message_replaces_the_default_one(api):
    messages = [{"role": "user", "content": "Hi"}]
    plain = api.client.chat.completions.create(model="mipha-tiny", messages=messages, max_tokens=12, temperature=0)
    told = api.client.chat.completions.create(
        model="mipha-tiny", messages=[{"role": "system", "content": "You answer in one word."}, *messages],
        max_tokens=12, temperature=0)
    assert told.usage.prompt_tokens != plain.usage.prompt_tokens


def test_api_calls_are_stored_in_nobodys_history(api):
    api.client.chat.completions.create(model="mipha-tiny", messages=photo_question(), max_tokens=4)
    from sqlalchemy import text

    with api.services.storage.session() as session:
        assert session.execute(text("SELECT count(*) FROM conversations")).scalar() == 0
        assert session.execute(text("SELECT count(*) FROM messages")).scalar() == 0
        assert session.execute(text("SELECT count(*) FROM images")).scalar() == 0


def test_a_client_that_disconnects_stops_its_generation(api):
    wait_idle(api.services)
    stream = api.client.chat.completions.create(model="mipha-tiny", messages=[{"role": "user", "content": "Go on"}],
                                                max_tokens=1024, temperature=0.8, stream=True)
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        if pieces == 3:
            break
    stream.close()
    job = [job for job in list(api.services.replies._jobs.values()) if job.key[1].startswith("api-")][-1]
    deadline = time.monotonic() + 10
    while not job.done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.done, "the reply went on after its client left"
    result = job.snapshot().outcome
    assert result.finish_reason == "cancelled" and result.stats.completion_tokens < 1024


def test_a_client_that_gives_up_on_a_whole_reply_stops_it_too(api):
    wait_idle(api.services)
    # greedy: the tiny model's 1024-token reply to this (about 5 s) never samples its end token early
    body = {"model": "mipha-tiny", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 1024,
            "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{api.url}v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(10, read=1.0))
    job = [job for job in list(api.services.replies._jobs.values()) if job.key[1].startswith("api-")][-1]
    deadline = time.monotonic() + 10
    while not job.done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.done and job.snapshot().outcome.finish_reason == "cancelled"


def test_the_queue_refuses_with_429_when_full(api):
    """Concurrency 1 and room for one waiting call: a third call is refused, not queued."""
    wait_idle(api.services)
    body = {"model": "mipha-tiny", "messages": [{"role": "user", "content": "Long"}], "max_tokens": 1024,
            "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=api.url, headers=headers, timeout=60) as client, \
            client.stream("POST", "v1/chat/completions", json=body) as running, \
            client.stream("POST", "v1/chat/completions", json=body) as waiting:
        assert running.status_code == 200 and waiting.status_code == 200
        refused = httpx.post(f"{api.url}v1/chat/completions", json=body, headers=headers, timeout=30)
    assert refused.status_code == 429
    assert refused.headers["retry-after"]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    wait_idle(api.services)


# --- what is refused, and how ----------------------------------------------------------------


def test_a_wrong_or_missing_key_gets_401_in_openais_shape(api):
    wrong = openai.OpenAI(base_url=f"{api.url}v1", api_key="not-a-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model="mipha-tiny", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.body["code"] == "invalid_api_key"
    bare = httpx.get(f"{api.url}v1/models", timeout=10)
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert bare.json()["error"]["type"] == "invalid_request_error"


def test_the_second_key_works_too(api):
    other = openai.OpenAI(base_url=f"{api.url}v1", api_key=OTHER_KEY, max_retries=0)
    assert [m.id for m in other.models.list()] == ["mipha-tiny"]


def test_a_wrong_key_is_refused_before_the_body_is_read(api):
    """An attacker without a key cannot make the server buffer a body: 401 at once, not 413."""
    big = b"x" * (8 * 1024 * 1024)
    response = httpx.post(f"{api.url}v1/chat/completions", content=big, timeout=30,
                          headers={"authorization": "Bearer wrong-0123456789abcdef", "content-type": "application/json"})
    assert response.status_code == 401


def test_an_oversized_body_gets_413_even_with_a_key(api):
    too_big = photo_question(uri="data:image/png;base64," + "A" * (3 * 1024 * 1024))
    with pytest.raises(openai.APIStatusError) as refused:
        api.client.chat.completions.create(model="mipha-tiny", messages=too_big)
    assert refused.value.status_code == 413


def test_a_remote_image_url_is_refused_and_never_fetched(api):
    fetched = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fetched.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for url in (f"http://127.0.0.1:{server.server_port}/cat.jpg", f"https://127.0.0.1:{server.server_port}/x"):
            with pytest.raises(openai.BadRequestError) as refused:
                api.client.chat.completions.create(model="mipha-tiny", messages=photo_question(uri=url))
            assert refused.value.body["code"] == "image_url_not_supported"
            assert "data: URI" in refused.value.body["message"]
    finally:
        server.shutdown()
    assert fetched == []


@pytest.mark.parametrize(("request_fields", "param"), [
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"stop": ["a"] * 5}, "stop"),
    ({"seed": "abc"}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),
    ({"stream": "yes"}, "stream"),
])
def test_bad_fields_get_400_naming_the_field(api, request_fields, param):
    body = {"model": "mipha-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **request_fields}
    response = httpx.post(f"{api.url}v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                          timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"] and "/" not in error["message"].replace("data:image/", "")


@pytest.mark.parametrize(("uri", "code"), [
    ("data:image/png;base64,not*base64", None),
    ("data:image/png;base64," + base64.b64encode(b"this is not an image").decode(), "invalid_image"),
    ("data:text/plain;base64,aGVsbG8=", None),
])
def test_broken_images_get_400(api, uri, code):
    with pytest.raises(openai.BadRequestError) as refused:
        api.client.chat.completions.create(model="mipha-tiny", messages=photo_question(uri=uri), max_tokens=4)
    assert refused.value.body["code"] == code
    assert refused.value.body["param"] == "messages[0].content[0].image_url"


def test_an_unknown_model_name_gets_404(api):
    with pytest.raises(openai.NotFoundError) as refused:
        api.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.body["code"] == "model_not_found"


def test_the_api_needs_no_login_cookie_but_the_page_still_does(api):
    assert httpx.get(f"{api.url}config", timeout=10).status_code == 401
    assert httpx.get(f"{api.url}v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200


def test_without_keys_the_api_is_not_there(tmp_path, app_tiny_engine):
    with launched(Settings(model="tiny", data_dir=tmp_path, port=free_port()), app_tiny_engine) as app:
        for method, path in (("GET", "v1/models"), ("POST", "v1/chat/completions")):
            response = httpx.request(method, f"{app.url}{path}", headers={"authorization": f"Bearer {KEY}"},
                                     timeout=10)
            assert response.status_code == 404
