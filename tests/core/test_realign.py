"""Replies are read back as the token ids they were generated as (``realign_replies``), so the
KV cache of a conversation covers them even when the tokenizer splits their text otherwise."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mipha_core.caching import CacheKey, PrefixKVCache, realign_replies, shared_prefix_length

END, IMAGE = 0, 99
PIECES = {END: "<end>", IMAGE: "", 1: "Q:", 2: " sun", 3: "set", 4: " sunset", 5: " red", 6: " re", 7: "d",
          8: " blue", 9: " more?"}
BYTES = {20: b"\xc3", 21: b"\xa9", 22: b"\xa8", 23: b"\xc3\xa9", 24: b"x"}
CHAT = CacheKey(owner="ada", conversation="chat-1")


def decode(ids) -> str:
    return "".join(PIECES[i] for i in ids)


def decode_bytes(ids) -> str:
    return b"".join(BYTES.get(i, PIECES.get(i, "").encode()) for i in ids).decode(errors="replace")


def realign(cached, new, **options):
    return realign_replies(cached, new, end_token_id=END, decode=options.pop("decode", decode), **options)


def test_a_reply_split_otherwise_gets_its_generated_ids_back():
    cached = [1, 2, 3, 5, END, 1, 9, 8]  # the model wrote " sun" + "set", then a second reply (cut, no end)
    new = [1, 4, 5, END, 1, 9, 8, END, 1, 9]  # the tokenizer reads " sunset"
    assert realign(cached, new) == [1, 2, 3, 5, END, 1, 9, 8, END, 1, 9]


def test_every_reply_is_realigned_and_the_last_one_needs_no_end_token():
    cached = [1, 2, 3, END, 1, 6, 7]  # the last reply's end token has no KV state: the ids stop before it
    new = [1, 4, END, 1, 5, END, 1, 9]
    assert realign(cached, new) == [1, 2, 3, END, 1, 6, 7, END, 1, 9]


def test_a_different_text_stops_the_walk():
    cached = [1, 2, 3, END, 1, 6, 7, END]
    new = [1, 8, END, 1, 5, END, 1, 9]  # the first reply was edited: what follows is new
    assert realign(cached, new) == new


def test_a_difference_in_the_open_question_is_left_alone():
    cached = [1, 2, 3, END, 1, 5]
    new = [1, 4]  # the question before any end token: nothing to realign against
    assert realign(cached, new) == new
    assert realign(cached, [1, 2, 3, END, 1, 9]) == [1, 2, 3, END, 1, 9]


def test_identical_and_prefix_prompts_are_unchanged():
    cached = [1, 2, 3, END, 1, 9]
    assert realign(cached, cached) == cached
    assert realign(cached, cached[:3]) == cached[:3]
    assert realign([], [1, 4, END]) == [1, 4, END]


def test_image_positions_are_never_spliced():
    cached = [1, IMAGE, IMAGE, 2, 3, END]
    new = [1, 4, END]  # decodes alike (image ids decode to nothing here), but one has a photo
    assert realign(cached, new, image_token_id=IMAGE) == new
    with_photo = [1, IMAGE, IMAGE, 4, END, 1, 9]
    assert realign(cached, with_photo, image_token_id=IMAGE) == [1, IMAGE, IMAGE, 2, 3, END, 1, 9]


def test_texts_are_compared_on_whole_characters():
    # both share the first byte of a two-byte character; the rest differs: é is not è
    cached = [1, 20, 21, END]
    new = [1, 20, 22, END, 1, 9]
    assert realign(cached, new, decode=decode_bytes) == new
    assert realign([1, 20, 21, END], [1, 23, END, 1, 9], decode=decode_bytes) == [1, 20, 21, END, 1, 9]


def test_shared_prefix_keeps_one_token_to_read_and_stops_at_another_photo():
    cached = [1, IMAGE, IMAGE, 2, 3]
    assert shared_prefix_length(cached, "a", cached, "a", image_token_id=IMAGE) == 4
    assert shared_prefix_length(cached, "a", [*cached, END, 1], "a", image_token_id=IMAGE) == 5
    assert shared_prefix_length(cached, "a", [*cached, END], "b", image_token_id=IMAGE) == 1
    assert shared_prefix_length(cached, "a", [], "a", image_token_id=IMAGE) == 0


def kv_cache(length: int) -> DynamicCache:
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, length, 2), torch.zeros(1, 1, length, 2), 0)
    return cache


def test_take_realigns_and_crops_to_what_the_realigned_prompt_shares():
    store = PrefixKVCache(10**6, image_token_id=IMAGE, end_token_id=END, decode=decode)
    store.put(CHAT, [1, 2, 3, 5, END], None, kv_cache(4))  # generated " sun" "set" " red", then the end
    hit = store.take(CHAT, [1, 4, 5, END, 1, 9], None)
    assert hit.token_ids == [1, 2, 3, 5, END, 1, 9]
    assert hit.reused_tokens == 4 == hit.cache.get_seq_length()
    assert len(store) == 0  # taken for exclusive use


def test_take_keeps_the_prompt_as_asked_when_the_realigned_one_is_too_long():
    store = PrefixKVCache(10**6, image_token_id=IMAGE, end_token_id=END, decode=decode)
    store.put(CHAT, [1, 2, 3, 5, END], None, kv_cache(4))
    asked = [1, 4, 5, END, 1, 9]
    hit = store.take(CHAT, asked, None, max_length=len(asked))
    assert hit.token_ids == asked and hit.reused_tokens == 1


def test_put_refuses_ids_shorter_than_the_cache():
    store = PrefixKVCache(10**6, image_token_id=IMAGE, end_token_id=END, decode=decode)
    with pytest.raises(ValueError, match="cache holds 3 tokens but only 2 ids"):
        store.put(CHAT, [1, 2], None, kv_cache(3))
