"""Streaming replies: text as it comes, finish reasons, cancellation, errors from the worker."""

from __future__ import annotations

import threading

import pytest
import torch

from mipha_core import InvalidGenerationParamsError, InvalidMessagesError, load_engine
from tests.core.conftest import assistant, user


def generated_ids(engine, messages, max_new_tokens):
    inputs = engine.encode(messages, max_new_tokens=max_new_tokens)
    output = engine.model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=engine.end_token_id, pad_token_id=engine.end_token_id,
        suppress_tokens=engine.suppressed_ids,
    )
    return output[0, inputs["input_ids"].shape[1]:]


def test_stream_yields_the_greedy_reply_piece_by_piece(engine, photo):
    messages = [user("What is in this photo?", photo)]
    reply = engine.stream(messages, max_new_tokens=48, temperature=0)
    chunks = list(reply)
    assert len(chunks) > 1
    expected = engine.tokenizer.decode(generated_ids(engine, messages, 48), skip_special_tokens=True).lstrip()
    assert "".join(chunks) == expected
    stats = reply.stats
    assert stats.finish_reason == "length" and stats.completion_tokens == 48
    assert stats.prompt_tokens == engine.encode(messages)["input_ids"].shape[1]
    assert stats.first_token_seconds is not None and stats.tokens_per_second > 0


def test_chunks_never_split_a_character(engine):
    for seed_question in ["Café 東京 😀?", "Привет!", "naïve résumé"]:
        reply = engine.stream([user(seed_question)], max_new_tokens=40, temperature=1.0, top_p=1.0)
        chunks = list(reply)
        whole = "".join(chunks)
        for chunk in chunks[:-1]:
            assert not chunk.endswith("\ufffd"), chunks
        assert whole == whole.encode("utf-8").decode("utf-8")


def test_greedy_is_deterministic_and_sampling_varies(engine, photo):
    messages = [user("Describe it", photo)]
    first = engine.stream(messages, max_new_tokens=24, temperature=0).text()
    assert engine.stream(messages, max_new_tokens=24, temperature=0).text() == first
    torch.manual_seed(0)
    samples = {engine.stream(messages, max_new_tokens=24, temperature=1.5).text() for _ in range(3)}
    assert len(samples) > 1


def test_end_token_finishes_with_stop(tiny_checkpoint, photo):
    engine = load_engine(str(tiny_checkpoint), device="cpu", dtype="float32")
    with torch.no_grad():
        engine.model.lm_head.bias[engine.end_token_id] = 1e4
    reply = engine.stream([user("Hi", photo)], max_new_tokens=20, temperature=0)
    assert reply.text() == ""
    assert reply.stats.finish_reason == "stop" and reply.stats.completion_tokens == 1


def test_cancel_stops_within_a_token(engine, photo):
    cancel = threading.Event()
    reply = engine.stream([user("Tell me everything", photo)], max_new_tokens=400, temperature=0, cancel=cancel)
    text = ""
    for chunk in reply:
        text += chunk
        if not cancel.is_set():
            cancel.set()
            tokens_at_cancel = reply._streamer.generated_tokens
    assert reply.stats.finish_reason == "cancelled"
    assert reply.stats.completion_tokens <= tokens_at_cancel + 1
    assert text


def test_leaving_the_loop_stops_the_worker(engine, photo):
    reply = engine.stream([user("Go on", photo)], max_new_tokens=400, temperature=0)
    for _ in reply:
        break
    reply._iterator.close()
    assert reply.cancel.is_set()
    assert not any(thread.name == "mipha-generate" for thread in threading.enumerate())


def test_worker_errors_reach_the_reader(tiny_checkpoint):
    engine = load_engine(str(tiny_checkpoint), device="cpu", dtype="float32")

    def explode(module, args):
        raise RuntimeError("kernel exploded")

    engine.model.lm_head.register_forward_pre_hook(explode)
    reply = engine.stream([user("Hi")], max_new_tokens=5)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        list(reply)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")],
)
def test_bad_generation_settings_are_refused(engine, settings, message):
    with pytest.raises(InvalidGenerationParamsError, match=message):
        engine.stream([user("Hi")], **settings)


def test_malformed_messages_are_refused(engine):
    with pytest.raises(InvalidMessagesError, match="end with a user message"):
        engine.encode([user("Hi"), assistant("Hello")])
    with pytest.raises(InvalidMessagesError, match="alternate"):
        engine.encode([assistant("Hello"), user("Hi")])


def test_rows_past_the_tokenizer_are_never_generated(tiny_checkpoint):
    engine = load_engine(str(tiny_checkpoint), device="cpu", dtype="float32")
    beyond = len(engine.tokenizer) + 3
    with torch.no_grad():
        engine.model.lm_head.bias[beyond] = 1e4
    reply = engine.stream([user("Hi")], max_new_tokens=8, temperature=0)
    assert reply.text().strip()
    assert reply.stats.completion_tokens == 8
