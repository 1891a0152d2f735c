"""``Engine``: a loaded Mipha model that turns chat messages into inputs and streamed replies."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mipha_core.caching import ByteBoundedLRU, CacheKey, PrefixKVCache, image_key
from mipha_core.fitting import MIN_REPLY_TOKENS, FittedEngine, PreparedPrompt, PromptFitter
from mipha_core.generation import CancelCriteria, CountingTextStreamer, GenerationParams, SeededChoice
from mipha_core.modeling import MiphaForConditionalGeneration
from mipha_core.preprocessing import ImagePreprocessor
from mipha_core.prompt import PhiPromptStyle
from mipha_core.streaming import ReplyStream

logger = logging.getLogger(__name__)

__all__ = ["MIN_REPLY_TOKENS", "CacheSettings", "Engine", "PreparedPrompt"]


@dataclass(frozen=True)
class CacheSettings:
    """Byte budgets of the follow-up caches; 0 turns a cache off (every turn re-reads everything)."""

    kv_cache_bytes: int = 2 * 1024**3
    image_feature_bytes: int = 128 * 1024**2
    """About 35 photos' projected features in bf16 (729 x 2560 values each)."""


class Engine(FittedEngine):
    """A loaded Mipha model, its tokenizer and preprocessor; the conversation rules are
    ``PromptFitter``'s (which turns fit, the reply budget, one image per prompt)."""

    def __init__(
        self,
        *,
        model: MiphaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        preprocessor: ImagePreprocessor,
        model_id: str,
        context_length: int,
        image_tokens: int,
        caches: CacheSettings = CacheSettings(),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.model_id = model_id
        self.end_token_id = tokenizer.convert_tokens_to_ids(PhiPromptStyle.stop_text)
        self.image_token_id = model.config.image_token_id
        self.fitter = PromptFitter(tokenizer, context_length=context_length, image_tokens=image_tokens,
                                   image_token_id=self.image_token_id)
        vocab_rows = model.config.text_config.vocab_size
        self.suppressed_ids = list(range(len(tokenizer), vocab_rows))
        self.kv_cache = PrefixKVCache(caches.kv_cache_bytes, image_token_id=self.image_token_id)
        self.image_features: ByteBoundedLRU[torch.Tensor] = ByteBoundedLRU(caches.image_feature_bytes)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def label(self) -> str:
        """What runs, for a person: e.g. "zhumj34/Mipha-3B · bfloat16 · cpu"."""
        return f"{self.model_id} · {str(self.dtype).removeprefix('torch.')} · {self.device}"

    def encode(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """Tensors for ``model(**inputs)`` and ``model.generate(**inputs)``: ``input_ids``,
        ``attention_mask`` and, when an image is sent, ``pixel_values``. Turns that do not fit
        with ``max_new_tokens`` of room are dropped as ``PromptFitter`` describes."""
        prepared = self.prepare(messages, max_new_tokens=max_new_tokens)
        inputs = self._text_inputs(prepared.token_ids)
        if prepared.image is not None:
            inputs["pixel_values"] = self._pixel_values(prepared.image)
        return inputs

    def stream(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.2,
        top_p: float = 1.0,
        cancel: threading.Event | None = None,
        cache: CacheKey | None = None,
        min_new_tokens: int = MIN_REPLY_TOKENS,
        seed: int | None = None,
    ) -> ReplyStream:
        """Start a reply to the last user message; iterate the result for text.

        The conversation is fitted as ``prepare`` does it, so a long question may get a reply
        budget below ``max_new_tokens`` (``ReplyStream.max_new_tokens`` says which). With
        ``cache``, the reply reuses the KV cache that conversation's previous reply left
        and the owner's cached photo features, and leaves its own for the next question;
        without, nothing is reused or kept. Raises ``ContextOverflowError`` here, before any
        generation, when the last question cannot fit. See ``ReplyStream`` for cancellation and
        for the figures in ``stats``. With ``seed``, sampling draws from a generator of its own
        seeded with it: the same conversation, settings and seed give the same reply.
        """
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        prepared = self.prepare(messages, max_new_tokens=params.max_new_tokens, min_new_tokens=min_new_tokens)
        params = replace(params, max_new_tokens=prepared.max_new_tokens)
        cancel = cancel or threading.Event()
        config = params.to_generation_config(end_token_id=self.end_token_id, suppressed_ids=self.suppressed_ids)
        image_hash = image_key(prepared.image) if prepared.image is not None else None
        hit = self.kv_cache.take(cache, prepared.token_ids, image_hash) if cache else None
        reused = hit.reused_tokens if hit else 0

        def run(streamer: CountingTextStreamer) -> torch.Tensor:
            inputs = self._text_inputs(prepared.token_ids)
            if prepared.image is not None and reused <= prepared.token_ids.index(self.image_token_id):
                features = self._image_features(
                    prepared.image, image_hash=image_hash, owner=cache.owner if cache else None, streamer=streamer
                )
                inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[features])}
            output = self.model.generate(
                **inputs,
                past_key_values=hit.cache if hit else None,
                generation_config=config,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]),
                logits_processor=LogitsProcessorList([SeededChoice(seed)] if seed is not None and config.do_sample
                                                     else []),
            )
            if cache is not None:
                grown = output.past_key_values
                self.kv_cache.put(cache, output.sequences[0, : grown.get_seq_length()].tolist(), image_hash, grown)
            return output.sequences

        return ReplyStream(
            run=run,
            streamer=CountingTextStreamer(self.tokenizer),
            cancel=cancel,
            prompt_tokens=prepared.prompt_tokens,
            dropped_turns=prepared.dropped_turns,
            reused_tokens=reused,
            max_new_tokens=params.max_new_tokens,
            end_token_id=self.end_token_id,
        )

    def forget(self, cache: CacheKey) -> None:
        """Free the KV cache kept for a conversation, e.g. when it is deleted."""
        self.kv_cache.forget(cache)

    def _image_features(
        self, image: Image.Image, *, image_hash: str, owner: str | None, streamer: CountingTextStreamer
    ) -> torch.Tensor:
        """Projected features of ``image`` (``(image_tokens, hidden)``), cached per owner and photo."""
        key = (owner, image_hash)
        cached = self.image_features.get(key) if owner is not None else None
        if cached is not None:
            return cached
        started = time.perf_counter()
        with torch.no_grad():
            features = self.model.model.get_image_features(pixel_values=self._pixel_values(image)).pooler_output[0]
        streamer.vision_seconds = time.perf_counter() - started
        if owner is not None:
            self.image_features.put(key, features, features.numel() * features.element_size())
        return features

    def _text_inputs(self, ids: list[int]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def model_image(self, image: Image.Image) -> Image.Image:
        """The photo as the vision tower sees it: padded to a square and resized (384 px for Mipha-3B)."""
        return self.preprocessor.model_image(image)

    def _pixel_values(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessor(image).to(device=self.device, dtype=self._vision_dtype())

    def _vision_dtype(self) -> torch.dtype:
        return self.model.model.vision_tower.embeddings.patch_embedding.weight.dtype

