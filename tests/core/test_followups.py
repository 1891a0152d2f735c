"""Follow-up questions reuse the previous turn's KV cache and the photo's features, and
answer exactly what a full re-read of the conversation would answer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mipha_core import CacheKey, load_engine
from mipha_core.caching import image_key
from mipha_core.engine import CacheSettings, Engine
from tests.core.conftest import assistant, user

CHAT = CacheKey(owner="ada", conversation="chat-1")
QUESTIONS = ["What is in this photo?", "What colour is the block?", "Is it daytime?", "Describe it as a poem."]


def fresh_engine(folder, caches: CacheSettings = CacheSettings()) -> Engine:
    engine = load_engine(str(folder), device="cpu", dtype="float32")
    return Engine(
        model=engine.model, tokenizer=engine.tokenizer, preprocessor=engine.preprocessor,
        model_id=engine.model_id, context_length=engine.context_length, image_tokens=engine.image_tokens,
        caches=caches,
    )


@pytest.fixture
def cached(tiny_checkpoint) -> Engine:
    return fresh_engine(tiny_checkpoint)


@pytest.fixture
def uncached(tiny_checkpoint) -> Engine:
    return fresh_engine(tiny_checkpoint, CacheSettings(kv_cache_bytes=0, image_feature_bytes=0))


def converse(engine: Engine, photo, questions=QUESTIONS, max_new_tokens=24, key=CHAT):
    messages, replies = [], []
    for index, question in enumerate(questions):
        messages.append(user(question, photo if index == 0 else None))
        stream = engine.stream(messages, max_new_tokens=max_new_tokens, temperature=0, cache=key)
        text = stream.text()
        replies.append((text, stream.stats))
        messages.append(assistant(text))
    return replies


def test_follow_ups_reuse_the_cache_and_answer_the_same(cached, uncached, photo):
    with_cache = converse(cached, photo)
    without = converse(uncached, photo)
    assert [text for text, _ in with_cache] == [text for text, _ in without]
    assert all(stats.reused_tokens == 0 for _, stats in without)
    assert with_cache[0][1].reused_tokens == 0
    for (_, previous), (_, stats) in zip(with_cache, with_cache[1:]):
        assert stats.reused_tokens >= previous.prompt_tokens
        assert stats.vision_seconds is None
    assert with_cache[0][1].vision_seconds is not None


def test_cached_logits_match_a_full_prefill(cached, photo):
    first = [user(QUESTIONS[0], photo)]
    answer = cached.stream(first, max_new_tokens=16, temperature=0, cache=CHAT).text()
    follow_up = first + [assistant(answer), user(QUESTIONS[1])]
    ids = cached.prepare(follow_up, max_new_tokens=0).token_ids
    hit = cached.kv_cache.take(CHAT, ids, image_key(photo))
    assert hit is not None and hit.reused_tokens > len(ids) // 2
    rest = torch.tensor([ids[hit.reused_tokens:]])
    with torch.no_grad():
        incremental = cached.model(
            input_ids=rest, attention_mask=torch.ones(1, len(ids), dtype=torch.long), past_key_values=hit.cache
        ).logits[0, -1]
        full = cached.model(**cached.encode(follow_up)).logits[0, -1]
    torch.testing.assert_close(incremental, full, atol=1e-4, rtol=1e-4)


def test_regenerate_rolls_back_to_before_the_reply(cached, uncached, photo):
    messages = [user(QUESTIONS[0], photo)]
    first = cached.stream(messages, max_new_tokens=20, temperature=0, cache=CHAT)
    first_text = first.text()
    again = cached.stream(messages, max_new_tokens=20, temperature=0, cache=CHAT)
    assert again.reused_tokens == first.stats.prompt_tokens - 1
    assert again.text() == first_text == uncached.stream(messages, max_new_tokens=20, temperature=0).text()


def test_a_new_image_invalidates_from_where_the_prompt_changes(cached, uncached, photo):
    messages = [user(QUESTIONS[0], photo)]
    messages.append(assistant(cached.stream(messages, max_new_tokens=12, temperature=0, cache=CHAT).text()))
    messages.append(user("And this one?", Image.new("RGB", (64, 64), (0, 200, 0))))
    reply = cached.stream(messages, max_new_tokens=12, temperature=0, cache=CHAT)
    ids = cached.prepare(messages, max_new_tokens=12).token_ids
    old_image_start = cached.prepare(messages[:1], max_new_tokens=0).token_ids.index(cached.image_token_id)
    assert reply.reused_tokens <= old_image_start < ids.index(cached.image_token_id)
    assert reply.text() == uncached.stream(messages, max_new_tokens=12, temperature=0).text()
    assert reply.stats.vision_seconds is not None


def test_the_same_photo_in_a_new_chat_skips_the_vision_tower(cached, photo):
    calls = []
    cached.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    cached.stream([user("What is this?", photo)], max_new_tokens=4, temperature=0, cache=CHAT).text()
    assert len(calls) == 1
    other_chat = [user("Hi"), assistant("Hello."), user("Look at my photo", photo)]
    reply = cached.stream(other_chat, max_new_tokens=4, temperature=0, cache=CacheKey("ada", "chat-2"))
    reply.text()
    assert len(calls) == 1
    assert reply.stats.vision_seconds is None


def test_one_persons_caches_never_serve_another(cached, photo):
    calls = []
    cached.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    question = [user("What is this?", photo)]
    cached.stream(question, max_new_tokens=4, temperature=0, cache=CHAT).text()
    stranger = cached.stream(question, max_new_tokens=4, temperature=0, cache=CacheKey("bob", "chat-1"))
    assert stranger.reused_tokens == 0
    stranger.text()
    assert len(calls) == 2 and stranger.stats.vision_seconds is not None


def test_replies_without_a_key_keep_nothing(cached, photo):
    cached.stream([user("What is this?", photo)], max_new_tokens=4, temperature=0).text()
    again = cached.stream([user("What is this?", photo)], max_new_tokens=4, temperature=0)
    again.text()
    assert again.stats.reused_tokens == 0 and again.stats.vision_seconds is not None
    assert cached.kv_cache.nbytes == 0 and len(cached.image_features) == 0


def test_forgetting_a_conversation_frees_its_cache(cached, photo):
    cached.stream([user("What is this?", photo)], max_new_tokens=4, temperature=0, cache=CHAT).text()
    assert cached.kv_cache.nbytes > 0
    cached.forget(CHAT)
    assert cached.kv_cache.nbytes == 0


def test_caches_stay_within_their_byte_budget(tiny_checkpoint, uncached, photo):
    budget = 1_200_000
    small = fresh_engine(tiny_checkpoint, CacheSettings(kv_cache_bytes=budget, image_feature_bytes=budget))
    for index in range(4):
        image = Image.new("RGB", (32, 32), (index * 60, 0, 0))
        key = CacheKey("ada", f"chat-{index}")
        reply = small.stream([user(f"Photo {index}", image)], max_new_tokens=8, temperature=0, cache=key)
        assert reply.text() == uncached.stream([user(f"Photo {index}", image)], max_new_tokens=8, temperature=0).text()
        assert 0 < small.kv_cache.nbytes <= budget
        assert small.image_features.nbytes <= budget
    assert len(small.kv_cache) == 1


def test_dropped_turns_still_answer_like_a_full_read(cached, uncached, photo):
    long_answer = "Many small details are worth describing at length here. " * 14
    messages = [user("Look", photo), assistant(long_answer)]
    for index in range(10):
        messages += [user(f"Question {index}"), assistant(long_answer)]
    messages.append(user("Last one"))
    first = cached.stream(messages[:-1] + [user("Warm up")], max_new_tokens=256, temperature=0, cache=CHAT)
    first.text()
    reply = cached.stream(messages, max_new_tokens=256, temperature=0, cache=CHAT)
    assert reply.dropped_turns > 0
    assert reply.text() == uncached.stream(messages, max_new_tokens=256, temperature=0).text()
