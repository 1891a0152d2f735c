"""Conversations longer than the context window drop whole turns, never part of one."""

from __future__ import annotations

import pytest
from PIL import Image

from mipha_core import ContextOverflowError, Engine
from mipha_core.engine import MIN_REPLY_TOKENS
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
    with pytest.raises(ContextOverflowError, match="too long for the model's 2048-position window with the photo"):
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


def question(extra_tokens: int) -> str:
    """A question that grows by exactly one token per unit (" the" is one token, also in the prompt)."""
    return "Describe it" + " the" * extra_tokens


def extra_tokens_for(engine, photo, prompt_tokens: int) -> int:
    """How many units make the prompt of a single question with ``photo`` ``prompt_tokens`` long."""
    return prompt_tokens - engine.prepare([user(question(0), photo)], max_new_tokens=0).prompt_tokens


def test_a_question_just_over_the_limit_gets_a_shorter_reply(engine, photo):
    messages = [user(question(extra_tokens_for(engine, photo, engine.context_length - 100)), photo)]
    prepared = engine.prepare(messages, max_new_tokens=512)
    assert prepared.prompt_tokens == engine.context_length - 100
    assert prepared.max_new_tokens == 100 and prepared.image_sent and prepared.dropped_turns == 0
    reply = engine.stream(messages, max_new_tokens=512, temperature=0)
    assert reply.max_new_tokens == 100
    reply.text()
    assert reply.stats.max_new_tokens == 100 and reply.stats.completion_tokens == 100
    assert reply.stats.finish_reason == "length"


def test_older_turns_go_before_the_reply_budget_shrinks(engine, photo):
    long_question = question(extra_tokens_for(engine, None, engine.context_length - 600))
    messages = [user("Look", photo), assistant(LONG_ANSWER), user(long_question)]
    prepared = engine.prepare(messages, max_new_tokens=512)
    assert prepared.dropped_turns == 1 and not prepared.image_sent and prepared.max_new_tokens == 512


def test_a_far_too_long_question_says_by_how_much(engine, photo):
    units = extra_tokens_for(engine, photo, engine.context_length + 500)
    with pytest.raises(ContextOverflowError) as raised:
        engine.prepare([user(question(units), photo)], max_new_tokens=512)
    error = raised.value
    assert (error.context_length, error.image_tokens) == (2048, engine.image_tokens)
    assert error.reply_tokens == MIN_REPLY_TOKENS
    assert error.prompt_tokens == engine.context_length + 500
    assert error.tokens_over == 500 + MIN_REPLY_TOKENS
    assert error.characters_over == pytest.approx(len(" the") * error.tokens_over, rel=0.01)
    assert f"about {error.tokens_over} tokens (roughly {error.characters_over:,} characters) too long" in str(error)
    shortened = engine.prepare([user(question(units - error.tokens_over), photo)], max_new_tokens=512)
    assert shortened.max_new_tokens == MIN_REPLY_TOKENS
    with pytest.raises(ContextOverflowError) as one_short:
        engine.prepare([user(question(units - error.tokens_over + 1), photo)], max_new_tokens=512)
    assert one_short.value.tokens_over == 1


def test_without_a_photo_the_error_does_not_mention_one(engine, photo):
    messages = [user("Look", photo), assistant("A photo."), user("word " * 3000)]
    with pytest.raises(ContextOverflowError) as raised:
        engine.prepare(messages, max_new_tokens=64)
    assert raised.value.image_tokens == 0 and "photo" not in str(raised.value)


def test_the_shortest_reply_is_an_argument_and_never_more_than_asked(engine, photo):
    messages = [user(question(extra_tokens_for(engine, photo, engine.context_length - 100)), photo)]
    with pytest.raises(ContextOverflowError) as raised:
        engine.prepare(messages, max_new_tokens=512, min_new_tokens=150)
    assert raised.value.tokens_over == 50
    assert engine.prepare(messages, max_new_tokens=16, min_new_tokens=150).max_new_tokens == 16
    with pytest.raises(ContextOverflowError):
        engine.stream(messages, max_new_tokens=512, min_new_tokens=150)


class CountingPreprocessor:
    """Wraps the real preprocessor and counts the photos it is asked to turn into pixels."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, image: Image.Image):
        self.calls += 1
        return self.inner(image)


def test_prepare_does_no_image_work(engine):
    counting = CountingPreprocessor(engine.preprocessor)
    watched = Engine(model=engine.model, tokenizer=engine.tokenizer, preprocessor=counting, model_id="tiny",
                     context_length=engine.context_length, image_tokens=engine.image_tokens)
    large = Image.new("RGB", (6000, 4000), (90, 160, 30))
    messages = [user("What is in this photo?", large)]
    prepared = watched.prepare(messages, max_new_tokens=512)
    assert prepared.image is large and counting.calls == 0
    reply = watched.stream(messages, max_new_tokens=2)
    reply.text()
    assert counting.calls == 1 and reply.stats.vision_seconds is not None
