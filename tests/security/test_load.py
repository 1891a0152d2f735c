"""Eight visitors at once over Gradio's own protocol: every one answered, none sees another's chat."""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import httpx
import pytest

from tests.app_process import running_app
from tests.security.gradio_protocol import chained, data_for, dependency, output_of, run_event

CLIENTS = 8
PARAMS = {"Temperature": 0.0, "Top-p": 1.0, "Max new tokens": 16}  # greedy, short replies


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("load"), "--concurrency", "2", name="load") as running:
        yield running


def visit(url: str, number: int) -> dict:
    """One visitor: ask a question that names them, follow the reply to its end, list their chats.

    As the page does: Send stores the question and starts the reply on the server, the event
    chained after it follows the reply (the open conversation comes from the session's state).
    """
    question = f"Question from visitor {number:02d} {secrets.token_hex(4)}"
    with closing(httpx.Client(base_url=url, timeout=120)) as client:
        client.get("")  # the page: the visitor cookie is set here
        config = client.get("config").json()
        session = secrets.token_hex(6)
        ask = dependency(config, elem_id="chat-input", event="submit")
        asked = run_event(client, ask, data_for(config, ask, {"chat-input": {"text": question, "files": []}, **PARAMS}),
                          session_hash=session)
        reply = chained(config, after=ask)
        replied = run_event(client, reply, data_for(config, reply, {}), session_hash=session)
        listing = dependency(config, elem_id="search-box", event="change")
        listed = run_event(client, listing, data_for(config, listing, {"search-box": ""}), session_hash=session)
    return {"question": question, "asked": asked, "replied": replied, "listed": listed, "config": config,
            "reply": reply, "listing": listing}


def test_eight_concurrent_visitors_get_their_own_replies_and_nothing_else(app):
    with ThreadPoolExecutor(CLIENTS) as pool:
        visits = list(pool.map(lambda n: visit(app.url, n), range(CLIENTS)))
    questions = [v["question"] for v in visits]
    for visit_result in visits:
        for step in ("asked", "replied", "listed"):
            assert visit_result[step].get("success") is True, (step, visit_result[step])
        seen = json.dumps([visit_result["asked"], visit_result["replied"], visit_result["listed"]])
        own = visit_result["question"]
        config = visit_result["config"]
        chat = output_of(config, visit_result["reply"], visit_result["replied"], "chatbot")
        assert [m["role"] for m in chat] == ["user", "assistant"]  # the reply came in their own conversation
        assert own in json.dumps(chat[0]) and "reply-footer" in json.dumps(chat[1])
        assert [q for q in questions if q in seen] == [own]  # and no one else's text anywhere
        choices = output_of(config, visit_result["listing"], visit_result["listed"], "conversation-list")["choices"]
        assert len(choices) == 1 and choices[0][0].startswith(own[:40])
