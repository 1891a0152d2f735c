"""Conversations longer than the context window drop whole turns, never part of one."""

from __future__ import annotations

import pytest
from PIL import Image

from mipha_core import ContextOverflowError
from tests.core.conftest import assistant, user

LONG_ANSWER = "The photo shows many small details worth describing at length. " * 12


def long_conversation(photo, turns):
    messages = [user("Question 0 about the photo", photo), assistant(LONG_ANSWER)]
    for index in range(1, turns):
        messages += [user(f"Question {index}"), assistant(LONG_ANSWER)]
    return messages + [user("Final question")]


def test_oldest_turns_are_dropped_and_the_image_turn_kept(engine, photo):
    messages = long_conversation(photo, turns=12)
    prepared = engine.prepare(messages, max_new_tokens=256)
    assert prepared.dropped_turns > 0
    assert prepared.image_sent
    assert prepared.prompt_tokens + 256 <= engine.context_length
    text = engine.tokenizer.decode([i for i in prepared.token_ids if i != engine.image_token_id])
    assert "Question 0 about the photo" in text and "Final question" in text
    assert "Question 1 " not in text
    kept_answers = text.count(LONG_ANSWER.strip())
    assert kept_answers == 12 - prepared.dropped_turns
    reply = engine.stream(messages, max_new_tokens=256, temperature=0)
    assert reply.dropped_turns == prepared.dropped_turns
    list(reply)
    assert reply.stats.dropped_turns == prepared.dropped_turns


def test_image_turn_goes_last_when_nothing_else_fits(engine, photo):
    messages = [user("Look", photo), assistant(LONG_ANSWER * 2), user("Now " + "tell me more " * 80)]
    prepared = engine.prepare(messages, max_new_tokens=900)
    assert prepared.dropped_turns == 1 and not prepared.image_sent
    assert "pixel_values" not in engine.encode(messages, max_new_tokens=900)


def test_a_question_that_cannot_fit_raises_before_generating(engine, photo):
    huge = "word " * 3000
    with pytest.raises(ContextOverflowError, match="shorten the question"):
        engine.stream([user(huge, photo)], max_new_tokens=64)


def test_fitting_conversation_drops_nothing(engine, photo):
    prepared = engine.prepare([user("Hi", photo), assistant("Hello."), user("More?")], max_new_tokens=512)
    assert prepared.dropped_turns == 0 and prepared.image_sent


def test_only_the_most_recent_image_is_sent_at_its_turn(engine, photo):
    second = Image.new("RGB", (50, 50), (0, 255, 0))
    messages = [user("First photo", photo), assistant("A gradient."), user("Second photo", second)]
    inputs = engine.encode(messages)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(engine.image_token_id) == engine.image_tokens
    before_image = engine.tokenizer.decode(ids[: ids.index(engine.image_token_id)])
    assert before_image.endswith("A gradient.<|endoftext|>USER: ")
    assert inputs["pixel_values"].shape == (1, 3, 384, 384)
    assert float(inputs["pixel_values"][0, 1, 192, 192]) == pytest.approx(1.0)
