"""Reading ahead while a question is typed (llama.cpp engine, tiny checkpoint): Send then reads only
what the draft did not cover, another person's reply is never held up by it, and the answer is the
one a fresh read gives."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mipha_core import CacheKey, load_engine
from mipha_core.llama_cpp_engine import LlamaCppEngine
from tests.core.conftest import assistant, user


@pytest.fixture(scope="module")
def llama(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> LlamaCppEngine:
    return load_engine(str(tiny_checkpoint), device="cpu", quantization="8bit", runtime="llama.cpp",
                       data_dir=tmp_path_factory.mktemp("gguf-data"))


@pytest.mark.parametrize(("typed", "sent"), [
    ("What is in th", "What is in this photo?"),
    ("", "Describe it."),
    ("Two  spaces and", "Two  spaces and more"),
    ("line one\nline", "line one\nline two"),
    ("Count 12", "Count 123 birds, please"),
    ("Why?", "Why? Tell me"),
])
def test_a_drafts_prompt_begins_the_prompt_of_the_question_sent(engine, photo, typed, sent):
    draft = engine.fitter.prepare_draft([user(typed, photo)], max_new_tokens=16).token_ids
    final = engine.prepare([user(sent, photo)], max_new_tokens=16).token_ids
    assert final[:len(draft)] == draft
    assert len(draft) > engine.image_tokens
    assert len(final) > len(draft)


def _read(engine: LlamaCppEngine, length: int) -> None:
    deadline = time.monotonic() + 20
    while engine.context.length < length and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the reader's bookkeeping after its last read


def test_send_after_a_draft_reads_only_the_rest_and_answers_as_a_fresh_read(llama, photo):
    key = CacheKey("ann", "typed")
    draft = llama.fitter.prepare_draft([user("What is in this", photo)], max_new_tokens=8).token_ids
    llama.prefetch([user("What is in this", photo)], max_new_tokens=8, cache=key)
    _read(llama, len(draft))
    sent = [user("What is in this photo?", photo)]
    reply = llama.stream(sent, max_new_tokens=8, temperature=0, cache=key)
    text = reply.text()
    assert reply.stats.reused_tokens == len(draft)
    assert reply.stats.vision_seconds is None  # the photo was looked at while the question was typed
    assert text == llama.stream(sent, max_new_tokens=8, temperature=0).text()


def test_a_follow_up_typed_after_a_reply_is_read_as_it_is_typed(llama, photo):
    """Answered as the same follow-up sent at once: the earlier reply's positions were read on the
    int8 decoder in both, where a fresh read reads them on the photo reader's fp16 weights."""
    key, at_once = CacheKey("ann", "follow"), CacheKey("ann", "follow at once")
    turn = [user("What is in this photo?", photo)]
    answer = llama.stream(turn, max_new_tokens=6, temperature=0, cache=key).text()
    assert llama.stream(turn, max_new_tokens=6, temperature=0, cache=at_once).text() == answer
    typing = [*turn, assistant(answer), user("And what colour is")]
    draft = llama.fitter.prepare_draft(typing, max_new_tokens=6).token_ids
    llama.prefetch(typing, max_new_tokens=6, cache=key)
    _read(llama, len(draft))
    sent = [*turn, assistant(answer), user("And what colour is the sky?")]
    reply = llama.stream(sent, max_new_tokens=6, temperature=0, cache=key)
    text = reply.text()
    assert reply.stats.reused_tokens == len(draft)
    assert reply.stats.prompt_tokens - reply.stats.reused_tokens <= 8  # " the sky?" and " ASSISTANT:"
    assert text == llama.stream(sent, max_new_tokens=6, temperature=0, cache=at_once).text()


def test_a_new_chats_draft_is_taken_over_by_the_conversation_its_send_creates_and_by_no_one_else(llama, photo):
    ann = CacheKey("ann", "")
    draft = llama.fitter.prepare_draft([user("What", photo)], max_new_tokens=8).token_ids
    llama.prefetch([user("What", photo)], max_new_tokens=8, cache=ann.new_chat())
    _read(llama, len(draft))
    bob = llama.stream([user("What is it?", photo)], max_new_tokens=4, temperature=0, cache=CacheKey("bob", "b1"))
    bob.text()
    assert bob.stats.reused_tokens == len(llama.shared_opening_ids) and bob.stats.vision_seconds is not None
    mine = llama.stream([user("What is it?", photo)], max_new_tokens=4, temperature=0,
                        cache=CacheKey("ann", "created-by-send"))
    mine.text()
    assert mine.stats.reused_tokens == len(draft)


def test_deleting_a_word_cuts_nothing_so_typing_it_again_costs_nothing(llama, photo):
    key = CacheKey("ann", "retype")
    longer = llama.fitter.prepare_draft([user("Is there a red square here", photo)], max_new_tokens=8).token_ids
    llama.prefetch([user("Is there a red square here", photo)], max_new_tokens=8, cache=key)
    _read(llama, len(longer))
    llama.prefetch([user("Is there a", photo)], max_new_tokens=8, cache=key)
    time.sleep(0.3)
    assert llama.context.length == len(longer)
    reply = llama.stream([user("Is there a red square here?", photo)], max_new_tokens=4, temperature=0, cache=key)
    reply.text()
    assert reply.stats.reused_tokens == len(longer)


@contextmanager
def _vision_held_at_its_first_layer(engine: LlamaCppEngine) -> Iterator[tuple[threading.Event, threading.Event,
                                                                             list[int]]]:
    """While inside, the vision tower waits in its first layer until ``release`` is set."""
    entered, release, layers_run = threading.Event(), threading.Event(), []

    def hold(*_: object) -> None:
        layers_run.append(1)
        if len(layers_run) == 1:
            entered.set()
            release.wait(10)

    layers = engine.vision._model.vision_tower.encoder.layers
    handles = [layer.register_forward_hook(hold) for layer in layers]
    try:
        yield entered, release, layers_run
    finally:
        release.set()
        for handle in handles:
            handle.remove()


def _reply_in_thread(engine: LlamaCppEngine, messages: list[dict], key: CacheKey) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        reply = engine.stream(messages, max_new_tokens=4, temperature=0, cache=key)
        result["text"] = reply.text()
        result["stats"] = reply.stats

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_another_persons_reply_stops_a_draft_being_read_at_once(llama, photo):
    with _vision_held_at_its_first_layer(llama) as (entered, release, layers_run):
        llama.prefetch([user("What is", photo)], max_new_tokens=8, cache=CacheKey("fay", "slow"))
        assert entered.wait(10)
        thread, result = _reply_in_thread(llama, [user("Hello there")], CacheKey("bob", "hello"))
        time.sleep(0.3)  # bob waits for the context, and tells ann's draft to stop
        assert thread.is_alive()
        release.set()
        thread.join(20)
    assert not thread.is_alive() and result["stats"].completion_tokens >= 1
    assert len(layers_run) == 1  # ann's photo stopped after the layer it was in
    again = llama.stream([user("What is it?", photo)], max_new_tokens=4, temperature=0, cache=CacheKey("fay", "slow"))
    again.text()
    assert again.stats.reused_tokens < llama.image_tokens  # its image was never read; now it is
    assert again.stats.vision_seconds is not None


def test_send_in_the_same_conversation_waits_for_its_draft_and_uses_it(llama, photo):
    key = CacheKey("eve", "same")
    draft = llama.fitter.prepare_draft([user("What is", photo)], max_new_tokens=8).token_ids
    with _vision_held_at_its_first_layer(llama) as (entered, release, layers_run):
        llama.prefetch([user("What is", photo)], max_new_tokens=8, cache=key)
        assert entered.wait(10)
        thread, result = _reply_in_thread(llama, [user("What is it?", photo)], key)
        time.sleep(0.3)
        release.set()
        thread.join(20)
    assert not thread.is_alive()
    assert len(layers_run) == len(llama.vision._model.vision_tower.encoder.layers)
    assert result["stats"].reused_tokens == len(draft)
