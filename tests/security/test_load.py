"""Eight visitors at once over Gradio's own protocol: every one answered, none sees another's chat."""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import httpx
import pytest

from tests.app_process import running_app
from tests.security.gradio_protocol import chained, dependency, run_event

CLIENTS = 8
PARAMS = [0.0, 1.0, 16]  # greedy, short replies


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("load"), "--concurrency", "2", name="load") as running:
        yield running


def visit(url: str, number: int) -> dict:
    """One visitor: ask a question that names them, read the streamed reply, list their chats."""
    question = f"Question from visitor {number:02d} {secrets.token_hex(4)}"
    with closing(httpx.Client(base_url=url, timeout=120)) as client:
        client.get("")  # the page: the visitor cookie is set here
        config = client.get("config").json()
        session = secrets.token_hex(6)
        ask = dependency(config, elem_id="chat-input", event="submit")
        asked = run_event(client, ask, [{"text": question, "files": []}, None, *PARAMS], session_hash=session)
        reply = chained(config, after=ask)
        replied = run_event(client, reply, [None, *PARAMS], session_hash=session)
        listing = dependency(config, elem_id="search-box", event="change")
        listed = run_event(client, listing, ["", None], session_hash=session)
    return {"question": question, "asked": asked, "replied": replied, "listed": listed}


def test_eight_concurrent_visitors_get_their_own_replies_and_nothing_else(app):
    with ThreadPoolExecutor(CLIENTS) as pool:
        visits = list(pool.map(lambda n: visit(app.url, n), range(CLIENTS)))
    questions = [v["question"] for v in visits]
    for visit_result in visits:
        for step in ("asked", "replied", "listed"):
            assert visit_result[step].get("success") is True, (step, visit_result[step])
        seen = json.dumps([visit_result["asked"], visit_result["replied"], visit_result["listed"]])
        own = visit_result["question"]
        assert own in json.dumps(visit_result["replied"])  # the reply came in their own conversation
        assert [q for q in questions if q in seen] == [own]  # and no one else's text anywhere
        choices = visit_result["listed"]["output"]["data"][0]["choices"]
        assert len(choices) == 1 and choices[0][0].startswith(own[:40])
