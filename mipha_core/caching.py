"""Caches that make follow-up questions fast: KV caches by token prefix, image features by hash.

A conversation about a photo is a growing prefix. After each reply the conversation's KV
cache (prompt and reply tokens) is kept; the next request reuses the prefix its own token ids
share with it, so only the new question is prefilled. Because reuse is decided by comparing
token ids (and the identity of the image behind the image tokens), anything that changes the
prefix — regenerating, editing, a new image, turns dropped for the context window — reuses
only the part that is still the same. Both caches are LRUs bounded in bytes; eviction only
costs a rebuild.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from PIL import Image
from transformers import DynamicCache

from mipha_core.images import image_bands

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


@dataclass(frozen=True)
class CacheHit:
    """A KV cache taken out of the store for exclusive use, holding ``reused_tokens`` tokens."""

    cache: DynamicCache
    reused_tokens: int


@dataclass(frozen=True)
class _Entry:
    token_ids: tuple[int, ...]
    image_key: str | None
    cache: DynamicCache


class PrefixKVCache:
    """The KV cache of each conversation's last reply, keyed by conversation.

    ``take`` removes the conversation's entry and crops it to the prefix the new prompt shares
    with it (the conversation has moved on, so the rest is stale); the caller ``put``s the grown
    cache back after the reply.
    """

    def __init__(self, max_bytes: int, *, image_token_id: int) -> None:
        self._store: ByteBoundedLRU[_Entry] = ByteBoundedLRU(max_bytes)
        self._image_token_id = image_token_id

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def __len__(self) -> int:
        return len(self._store)

    def take(self, key: CacheKey, token_ids: Sequence[int], image_key: str | None) -> CacheHit | None:
        """The conversation's cache cropped to the prefix it shares with ``token_ids``.

        At least one token is always left to prefill, since the next token's logits come
        from the last prompt position.
        """
        entry = self._store.pop(key)
        if entry is None:
            return None
        length = self._reusable_length(entry, token_ids, image_key)
        if length == 0:
            return None
        entry.cache.crop(length - entry.cache.get_seq_length())
        return CacheHit(cache=entry.cache, reused_tokens=length)

    def put(self, key: CacheKey, token_ids: Sequence[int], image_key: str | None, cache: DynamicCache) -> None:
        """Keep ``cache``, which holds the KV states of exactly ``token_ids``, for ``key``."""
        if cache.get_seq_length() != len(token_ids):
            raise ValueError(f"cache holds {cache.get_seq_length()} tokens but {len(token_ids)} ids were given")
        entry = _Entry(token_ids=tuple(token_ids), image_key=image_key, cache=cache)
        self._store.put(key, entry, _cache_nbytes(cache))

    def forget(self, key: CacheKey) -> None:
        """Free a conversation's cache (e.g. when it is deleted)."""
        self._store.pop(key)

    def _reusable_length(self, entry: _Entry, token_ids: Sequence[int], image_key: str | None) -> int:
        common = _common_prefix_length(entry.token_ids, token_ids)
        if entry.image_key != image_key and self._image_token_id in entry.token_ids[:common]:
            common = entry.token_ids.index(self._image_token_id)
        return min(common, len(token_ids) - 1)


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = min(len(first), len(second))
    if length == 0:
        return 0
    a = torch.tensor(first[:length])
    b = torch.tensor(second[:length])
    mismatches = (a != b).nonzero()
    return int(mismatches[0]) if len(mismatches) else length


def _cache_nbytes(cache: DynamicCache) -> int:
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if tensor is not None
    )


def image_key(image: Image.Image) -> str:
    """A content hash of the decoded pixels, so the same photo matches however it arrived.

    Hashed a band of rows at a time: the same digest as hashing ``image.tobytes()``, without
    a copy of the whole photo (and Pillow's twice-as-large join) just to hash it."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.size}".encode())
    for _, band in image_bands(image):
        digest.update(band.tobytes())
    return digest.hexdigest()
