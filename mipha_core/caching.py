"""Caches that make follow-up questions fast: KV caches by token prefix, image features by hash.

A conversation about a photo is a growing prefix. After each reply the KV cache (prompt and
reply tokens) is kept; the next request reuses the longest cached prefix of its own token
ids, so only the new question is prefilled. Because reuse is decided by comparing token ids
(and the identity of the image behind the image tokens), anything that changes the prefix —
regenerating, editing, a new image, turns dropped for the context window — reuses only the
part that is still the same. Both caches are LRUs bounded in bytes; eviction only costs a
rebuild.
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

    def items(self) -> list[tuple[object, Value]]:
        with self._lock:
            return [(key, value) for key, (value, _) in self._entries.items()]


@dataclass(frozen=True)
class PromptKey:
    """Token ids of a cached prefix and the image its image tokens stand for."""

    token_ids: tuple[int, ...]
    image_key: str | None


@dataclass(frozen=True)
class CacheHit:
    """A KV cache taken out of the store for exclusive use, holding ``reused_tokens`` tokens."""

    cache: DynamicCache
    reused_tokens: int


class PrefixKVCache:
    """KV caches keyed by the tokens they hold. ``take`` removes the entry it returns, so two
    requests never extend the same cache; the caller ``put``s the grown cache back."""

    def __init__(self, max_bytes: int, *, image_token_id: int) -> None:
        self._store: ByteBoundedLRU[DynamicCache] = ByteBoundedLRU(max_bytes)
        self._image_token_id = image_token_id

    @property
    def nbytes(self) -> int:
        return self._store.nbytes

    def take(self, token_ids: Sequence[int], image_key: str | None) -> CacheHit | None:
        """The cache sharing the longest prefix with ``token_ids``, cropped to that prefix.

        At least one token is always left to prefill, since the next token's logits come
        from the last prompt position.
        """
        best_key, best_length = None, 0
        for key, _ in self._store.items():
            length = self._reusable_length(key, token_ids, image_key)
            if length > best_length:
                best_key, best_length = key, length
        if best_key is None:
            return None
        cache = self._store.pop(best_key)
        if cache is None:
            return None
        cache.crop(best_length - cache.get_seq_length())
        return CacheHit(cache=cache, reused_tokens=best_length)

    def put(self, token_ids: Sequence[int], image_key: str | None, cache: DynamicCache) -> None:
        """Keep ``cache``, which holds the KV states of exactly ``token_ids``."""
        if cache.get_seq_length() != len(token_ids):
            raise ValueError(f"cache holds {cache.get_seq_length()} tokens but {len(token_ids)} ids were given")
        key = PromptKey(token_ids=tuple(token_ids), image_key=image_key)
        self._store.put(key, cache, _cache_nbytes(cache))

    def _reusable_length(self, key: PromptKey, token_ids: Sequence[int], image_key: str | None) -> int:
        common = _common_prefix_length(key.token_ids, token_ids)
        if key.image_key != image_key and self._image_token_id in key.token_ids[:common]:
            common = key.token_ids.index(self._image_token_id)
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
    """A content hash of the decoded pixels, so the same photo matches however it arrived."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
