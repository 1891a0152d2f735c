"""Follow-up questions reuse the previous turn's KV cache and the photo's features, and
answer exactly what a full read of the same token ids would answer. Earlier replies are read
as the ids they were generated as, so a follow-up reads only its new question; a stored photo
is not even decoded."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mipha_core import CacheKey, GenerationParams, load_engine
from mipha_core.engine import CacheSettings, Engine
from mipha_core.photos import StoredPhoto, photo_key
from tests.core.conftest import assistant, user
from tests.core.test_photos import Opener

CHAT = CacheKey(owner="ada", conversation="chat-1")
QUESTIONS = ["What is in this photo?", "What colour is the block?", "Is it daytime?", "Describe it as a poem."]
BLUE = Image.new("RGB", (64, 64), (0, 0, 200))
"""The tiny model's replies about this photo start with a space, as Mipha's do, so the prompt
carries them as the same text; the tokenizer splits that text otherwise than they were generated."""


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


def read_from_scratch(engine: Engine, ids: list[int], image: Image.Image, max_new_tokens: int) -> list[int]:
    """The greedy ids generated after ``ids`` with no cache at all: what a full read answers."""
    config = GenerationParams(max_new_tokens=max_new_tokens, temperature=0).to_generation_config(
        end_token_id=engine.end_token_id, suppressed_ids=engine.suppressed_ids)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        output = engine.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       pixel_values=engine.preprocessor(image), generation_config=config)
    return output.sequences[0, len(ids):].tolist()


def read_and_generated(engine: Engine, stats, key=CHAT) -> tuple[list[int], list[int]]:
    """The prompt ids a reply read and the ids it generated."""
    kept = list(engine.kv_cache.kept_ids(key))
    return kept[: stats.prompt_tokens], kept[stats.prompt_tokens:]


@pytest.mark.parametrize("image", ["photo", "blue"])
def test_follow_ups_reuse_the_cache_and_answer_as_a_full_read(cached, uncached, photo, image):
    image = photo if image == "photo" else BLUE
    with_cache = converse(cached, image)
    assert with_cache[0][1].reused_tokens == 0 and with_cache[0][1].vision_seconds is not None
    for (_, previous), (_, stats) in zip(with_cache, with_cache[1:]):
        assert stats.reused_tokens >= previous.prompt_tokens
        assert stats.vision_seconds is None
    read, generated = read_and_generated(cached, with_cache[-1][1])
    assert generated == read_from_scratch(uncached, read, image, 24)
    assert converse(uncached, image, QUESTIONS[:1])[0][0] == with_cache[0][0]


def test_a_follow_up_about_a_stored_photo_reads_only_the_new_question(cached, uncached):
    opener = Opener(BLUE)
    messages = [user(QUESTIONS[0], StoredPhoto(key="b1" * 32, open=opener))]
    messages.append(assistant(cached.stream(messages, max_new_tokens=24, temperature=0, cache=CHAT).text()))
    assert opener.calls == 1
    earlier = list(cached.kv_cache.kept_ids(CHAT))  # the first prompt and reply, as read and generated
    messages.append(user(QUESTIONS[1]))
    asked = cached.prepare(messages, max_new_tokens=24).token_ids
    reply = cached.stream(messages, max_new_tokens=24, temperature=0, cache=CHAT)
    messages.append(assistant(reply.text()))
    read, generated = read_and_generated(cached, reply.stats)
    assert read != asked  # the tokenizer splits the reply otherwise than it was generated: a real case
    assert read[: len(earlier)] == earlier  # ... yet it is read as generated
    # everything before the new question comes from the cache, but the reply's last token,
    # which was generated but never read back
    assert reply.stats.reused_tokens == len(earlier) - 1
    assert reply.stats.vision_seconds is None and opener.calls == 1  # the photo was not even decoded
    assert generated == read_from_scratch(uncached, read, BLUE, 24)
    messages.append(user(QUESTIONS[2]))
    again = cached.stream(messages, max_new_tokens=24, temperature=0, cache=CHAT)
    again.text()
    assert again.stats.reused_tokens >= reply.stats.prompt_tokens and opener.calls == 1


def test_cached_logits_match_a_full_prefill(cached, photo):
    first = [user(QUESTIONS[0], photo)]
    answer = cached.stream(first, max_new_tokens=16, temperature=0, cache=CHAT).text()
    follow_up = first + [assistant(answer), user(QUESTIONS[1])]
    hit = cached.kv_cache.take(CHAT, cached.prepare(follow_up, max_new_tokens=0).token_ids, photo_key(photo))
    assert hit is not None and hit.reused_tokens > len(hit.token_ids) // 2
    ids = hit.token_ids
    rest = torch.tensor([ids[hit.reused_tokens:]])
    with torch.no_grad():
        incremental = cached.model(
            input_ids=rest, attention_mask=torch.ones(1, len(ids), dtype=torch.long), past_key_values=hit.cache
        ).logits[0, -1]
        full = cached.model(input_ids=torch.tensor([ids]), pixel_values=cached.preprocessor(photo)).logits[0, -1]
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
    assert cached.kv_cache.nbytes == 0 and len(cached.photo_features.features) == 0


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
        assert small.photo_features.features.nbytes <= budget
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
