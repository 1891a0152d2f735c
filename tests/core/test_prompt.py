"""The prompt is Mipha's phi template, tokenized chunk-wise around the image, token by token."""

from __future__ import annotations

from tokenizers import Tokenizer

from mipha_core.conversation import turns_from_messages
from mipha_core.prompt import SYSTEM_PROMPT, PhiPromptStyle
from tests.core.conftest import assistant, user


def independent_ids(tiny_checkpoint, engine, text_with_placeholder: str) -> list[int]:
    """The original recipe: split at <image>, tokenize each chunk alone, join with the image."""
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    chunks = [tokenizer.encode(chunk, add_special_tokens=False).ids for chunk in text_with_placeholder.split("<image>")]
    ids = chunks[0]
    for chunk in chunks[1:]:
        ids = ids + [engine.image_token_id] * engine.image_tokens + chunk
    return ids


def test_single_image_question_matches_the_original_template(engine, tiny_checkpoint, photo):
    prompt = PhiPromptStyle().render(turns_from_messages([user("What is this?", photo)]), image_turn=0)
    assert prompt.text == SYSTEM_PROMPT + " USER: <image>\nWhat is this? ASSISTANT:"
    ids = engine.encode([user("What is this?", photo)])["input_ids"][0].tolist()
    assert ids == independent_ids(tiny_checkpoint, engine, prompt.text)


def test_multi_turn_prompt_ends_answers_with_endoftext(engine, tiny_checkpoint, photo):
    messages = [user("What is this?", photo), assistant("A red square."), user("And the colour?")]
    prompt = PhiPromptStyle().render(turns_from_messages(messages), image_turn=0)
    expected = (
        SYSTEM_PROMPT + " USER: <image>\nWhat is this? ASSISTANT: A red square.<|endoftext|>"
        "USER: And the colour? ASSISTANT:"
    )
    assert prompt.text == expected
    ids = engine.encode(messages)["input_ids"][0].tolist()
    assert ids == independent_ids(tiny_checkpoint, engine, expected)
    assert ids.count(engine.end_token_id) == 1


def test_text_only_prompt_has_no_image_tokens(engine, tiny_checkpoint):
    inputs = engine.encode([user("Hello there")])
    assert "pixel_values" not in inputs
    ids = inputs["input_ids"][0].tolist()
    assert ids == independent_ids(tiny_checkpoint, engine, SYSTEM_PROMPT + " USER: Hello there ASSISTANT:")
    assert engine.image_token_id not in ids


def test_image_opens_the_turn_that_carries_it(engine, tiny_checkpoint, photo):
    messages = [user("Hi"), assistant("Hello."), user("Look at this", photo)]
    text = SYSTEM_PROMPT + " USER: Hi ASSISTANT: Hello.<|endoftext|>USER: <image>\nLook at this ASSISTANT:"
    assert engine.encode(messages)["input_ids"][0].tolist() == independent_ids(tiny_checkpoint, engine, text)


def test_typed_image_placeholder_stays_text(engine, photo):
    ids = engine.encode([user("what does <image> mean?", photo)])["input_ids"][0].tolist()
    assert ids.count(engine.image_token_id) == engine.image_tokens
