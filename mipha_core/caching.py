"""Caches that make follow-up questions fast: KV caches by token prefix (image features: ``photos``).

A conversation about a photo is a growing prefix. After each reply the conversation's KV
cache (prompt and reply tokens) is kept with the token ids the reply was generated as; the
next request reuses the prefix its own token ids share with it, so only the new question is
prefilled. The next prompt carries the reply as text, which the tokenizer may split otherwise
than the model generated it, so those spans are first given back their generated ids
(``realign_replies``). Because reuse is decided by comparing token ids (and the identity of the
image behind the image tokens), anything that changes the prefix — regenerating, editing, a new
image, turns dropped for the context window — reuses only the part that is still the same. The
caches are LRUs bounded in bytes; eviction only costs a rebuild.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from transformers import DynamicCache

Value = TypeVar("Value")


class ByteBoundedLRU(Generic[Value]):
    """A thread-safe LRU whose entries are evicted oldest first once their sizes exceed ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[object, tuple[Value, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: object) -> Value | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def pop(self, key: object) -> Value | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            return None if entry is None else entry[0]

    def put(self, key: object, value: Value, nbytes: int) -> None:
        """Store ``value``; one larger than the whole budget is not kept at all."""
        with self._lock:
            self._entries.pop(key, None)
            if nbytes > self.max_bytes:
                return
            self._entries[key] = (value, nbytes)
            while sum(size for _, size in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)


@dataclass(frozen=True)
class CacheKey:
    """Whose caches a reply may use: KV caches are kept per conversation, photo features per
    owner, so one person's photos and questions never speed up (or show up in) another's."""

    owner: str
    conversation: str

    def new_chat(self) -> CacheKey:
        """The key of this owner's chat that has no conversation yet: what its first question reads
        while it is typed is kept there, and the conversation its Send creates takes it over."""
        return CacheKey(owner=self.owner, conversation=NEW_CHAT)


NEW_CHAT = ""


@dataclass(frozen=True)
class CacheHit:
    """A KV cache taken out of the store for exclusive use, holding ``reused_tokens`` tokens.

    ``token_ids`` is the prompt to read: the one asked for, with the earlier replies given back
    the ids they were generated as (``realign_replies``); the cache holds its first
    ``reused_tokens`` positions.
    """

    cache: DynamicCache
    reused_tokens: int
    token_ids: list[int]


@dataclass(frozen=True)
class _Entry:
    token_ids: tuple[int, ...]
    """The ids the cache holds, then any generated after them (the reply's last token has no KV state)."""
    image_key: str | None
    cache: DynamicCache


class PrefixKVCache:
    """The KV cache of each conversation's last reply, keyed by conversation.

    ``take`` removes the conversation's entry and crops it to the prefix the new prompt shares
    with it (the conversation has moved on, so the rest is stale); the caller ``put``s the grown
    cache back after the reply. ``decode`` (ids to text, as the reply was streamed) and
    ``end_token_id`` (what ends a reply) serve ``realign_replies``.
    """

    def __init__(self, max_bytes: int, *, image_token_id: int, end_token_id: int,
                 decode: Callable[[Sequence[int]], str]) -> None:
        self._store: ByteBoundedLRU[_Entry] = ByteBoundedLRU(max_bytes)
        self._image_token_id = image_token_id
        self._end_token_id = end_token_id
        self._decode = decode

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def __len__(self) -> int:
        return len(self._store)

    def take(self, key: CacheKey, token_ids: Sequence[int], image_key: str | None, *,
             max_length: int | None = None) -> CacheHit | None:
        """The conversation's cache cropped to the prefix it shares with ``token_ids`` (realigned).

        At least one token is always left to prefill, since the next token's logits come
        from the last prompt position. A realigned prompt longer than ``max_length`` (the
        window less the reply's room) is not used: ``token_ids`` are matched as they are.
        """
        entry = self._store.pop(key)
        if entry is None:
            return None
        ids = realign_replies(entry.token_ids, token_ids, end_token_id=self._end_token_id, decode=self._decode,
                              image_token_id=self._image_token_id)
        if max_length is not None and len(ids) > max_length:
            ids = list(token_ids)
        held = entry.token_ids[: entry.cache.get_seq_length()]
        length = shared_prefix_length(held, entry.image_key, ids, image_key, image_token_id=self._image_token_id)
        if length == 0:
            return None
        entry.cache.crop(length - entry.cache.get_seq_length())
        return CacheHit(cache=entry.cache, reused_tokens=length, token_ids=ids)

    def put(self, key: CacheKey, token_ids: Sequence[int], image_key: str | None, cache: DynamicCache) -> None:
        """Keep ``cache`` for ``key``: it holds the KV states of the first ``token_ids``; ids after
        those (the reply's last token, which was never read back) only serve ``realign_replies``."""
        if cache.get_seq_length() > len(token_ids):
            raise ValueError(f"cache holds {cache.get_seq_length()} tokens but only {len(token_ids)} ids were given")
        entry = _Entry(token_ids=tuple(token_ids), image_key=image_key, cache=cache)
        self._store.put(key, entry, _cache_nbytes(cache))

    def kept_ids(self, key: CacheKey) -> tuple[int, ...]:
        """The ids kept for a conversation (its last prompt and reply, as read and generated); () if none."""
        entry = self._store.get(key)
        return entry.token_ids if entry is not None else ()

    def forget(self, key: CacheKey) -> None:
        """Free a conversation's cache (e.g. when it is deleted)."""
        self._store.pop(key)


def shared_prefix_length(cached_ids: Sequence[int], cached_image_key: str | None, new_ids: Sequence[int],
                         new_image_key: str | None, *, image_token_id: int) -> int:
    """How many leading KV states of ``cached_ids`` a prompt of ``new_ids`` can keep.

    The common prefix of the ids, cut before the image tokens when another photo (or none)
    is behind them, and at most ``len(new_ids) - 1``: the last prompt token is always read,
    since the next token's logits come from it.
    """
    common = _first_difference(cached_ids, new_ids)
    if cached_image_key != new_image_key and image_token_id in cached_ids[:common]:
        common = list(cached_ids).index(image_token_id)
    return max(0, min(common, len(new_ids) - 1))


def realign_replies(cached_ids: Sequence[int], new_ids: Sequence[int], *, end_token_id: int,
                    decode: Callable[[Sequence[int]], str], image_token_id: int | None = None) -> list[int]:
    """``new_ids`` with every span that differs from ``cached_ids`` only in tokenization replaced
    by ``cached_ids``' span, so that a reply is read back as the ids it was generated as.

    The next prompt carries a reply as text, and the tokenizer may split it otherwise than the
    model generated it (the model is free to, say, spell "sunset" as "sun" + "set"); the
    prefix match would then stop inside the reply and the reply would be read again. Both
    lists are walked from the start. At a first difference ``i``, the spans run to the next
    ``end_token_id`` (the end of that reply; in ``cached_ids`` its end, if there is none: the
    last reply's end token has no KV state). When they decode to the same text, ``new_ids``
    takes the cached span and the walk goes on after it; otherwise the walk stops there.

    The texts are decoded from the last end token before ``i``, so a difference inside a
    character's bytes is judged on whole characters. ``decode`` should be the one the reply was
    streamed with: then a span is taken back exactly when the stored text is what its ids
    decode to. Spans holding ``image_token_id`` are never spliced: image positions are not text.
    """
    new = list(new_ids)
    position = 0
    while True:
        i = _first_difference(cached_ids, new, position)
        if i >= min(len(cached_ids), len(new)):
            return new
        j = _next(cached_ids, end_token_id, i, missing=len(cached_ids))
        k = _next(new, end_token_id, i, missing=None)
        if k is None or not _same_text(cached_ids, new, i, j, k, end_token_id=end_token_id, decode=decode,
                                       image_token_id=image_token_id):
            return new
        new[i:k] = cached_ids[i:j]
        position = j


def _same_text(cached_ids: Sequence[int], new: list[int], i: int, j: int, k: int, *, end_token_id: int,
               decode: Callable[[Sequence[int]], str], image_token_id: int | None) -> bool:
    """Whether ``cached_ids[i:j]`` and ``new[i:k]`` are the same text (decoded from the segment's start)."""
    cached_span, new_span = cached_ids[i:j], new[i:k]
    if image_token_id is not None and (image_token_id in cached_span or image_token_id in new_span):
        return False
    start = i
    while start > 0 and new[start - 1] not in (end_token_id, image_token_id):
        start -= 1
    return decode(cached_ids[start:j]) == decode(new[start:k])


def _next(ids: Sequence[int], token: int, start: int, *, missing: int | None) -> int | None:
    for index in range(start, len(ids)):
        if ids[index] == token:
            return index
    return missing


def _first_difference(first: Sequence[int], second: Sequence[int], start: int = 0) -> int:
    """The first index at or after ``start`` where the two differ, or the shorter one's length."""
    length = min(len(first), len(second))
    index = start
    while index < length and first[index] == second[index]:
        index += 1
    return index


def _cache_nbytes(cache: DynamicCache) -> int:
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if tensor is not None
    )
