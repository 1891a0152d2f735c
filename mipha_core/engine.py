"""``Engine``: a loaded Mipha model that turns chat messages into inputs and streamed replies."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mipha_core.caching import CacheKey, PrefixKVCache
from mipha_core.fitting import MIN_REPLY_TOKENS, FittedEngine, PreparedPrompt, PromptFitter
from mipha_core.generation import CancelCriteria, CountingTextStreamer, GenerationParams, SeededChoice
from mipha_core.modeling import MiphaForConditionalGeneration
from mipha_core.photos import Photo, PhotoFeatures, open_photo, photo_key
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
    """About 35 photos' projected features in bf16 (729 x 2560 values each); with them, the
    model inputs of the last few photos (see ``PhotoFeatures``)."""


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
        precision_label: str | None = None,
    ) -> None:
        self.model = model
        self.precision_label = precision_label
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self.model_id = model_id
        self.end_token_id = tokenizer.convert_tokens_to_ids(PhiPromptStyle.stop_text)
        self.image_token_id = model.config.image_token_id
        self.fitter = PromptFitter(tokenizer, context_length=context_length, image_tokens=image_tokens,
                                   image_token_id=self.image_token_id)
        vocab_rows = model.config.text_config.vocab_size
        self.suppressed_ids = list(range(len(tokenizer), vocab_rows))
        self.kv_cache = PrefixKVCache(caches.kv_cache_bytes, image_token_id=self.image_token_id,
                                      end_token_id=self.end_token_id, decode=tokenizer.decode)
        self.photo_features = PhotoFeatures(preprocessor=preprocessor, encode=self._encode_image,
                                            max_bytes=caches.image_feature_bytes)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def label(self) -> str:
        """What runs, for a person: e.g. "zhumj34/Mipha-3B · bfloat16 · cpu"."""
        if self.precision_label is not None:
            return f"{self.model_id} · {self.precision_label}"
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
        without, nothing is reused or kept. A photo whose image positions the KV cache covers
        is not looked at (a ``StoredPhoto`` is not even decoded), and earlier replies are read as
        the token ids they were generated as (see ``caching.realign_replies``), so that a
        follow-up reads only the new question. Raises ``ContextOverflowError`` here, before any
        generation, when the last question cannot fit. See ``ReplyStream`` for cancellation and
        for the figures in ``stats``. With ``seed``, sampling draws from a generator of its own
        seeded with it: the same conversation, settings and seed give the same reply.
        """
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        prepared = self.prepare(messages, max_new_tokens=params.max_new_tokens, min_new_tokens=min_new_tokens)
        params = replace(params, max_new_tokens=prepared.max_new_tokens)
        cancel = cancel or threading.Event()
        image_hash = photo_key(prepared.image) if prepared.image is not None else None
        room = min(min_new_tokens, prepared.max_new_tokens)
        hit = self.kv_cache.take(cache, prepared.token_ids, image_hash,
                                 max_length=self.context_length - room) if cache else None
        ids, reused = (hit.token_ids, hit.reused_tokens) if hit else (prepared.token_ids, 0)
        params = replace(params, max_new_tokens=min(params.max_new_tokens, self.context_length - len(ids)))
        config = params.to_generation_config(end_token_id=self.end_token_id, suppressed_ids=self.suppressed_ids)

        def run(streamer: CountingTextStreamer) -> torch.Tensor:
            inputs = self._text_inputs(ids)
            if prepared.image is not None and reused <= ids.index(self.image_token_id):
                features, streamer.vision_seconds = self.photo_features.get(
                    prepared.image, owner=cache.owner if cache else None)
                inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[features])}
            output = self.model.generate(
                **inputs,
                past_key_values=hit.cache if hit else None,
                generation_config=config,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]),
                logits_processor=LogitsProcessorList([SeededChoice(seed, params)] if seed is not None and config.do_sample
                                                     else []),
            )
            if cache is not None:
                self.kv_cache.put(cache, output.sequences[0].tolist(), image_hash, output.past_key_values)
            return output.sequences

        return ReplyStream(
            run=run,
            streamer=CountingTextStreamer(self.tokenizer),
            cancel=cancel,
            prompt_tokens=len(ids),
            dropped_turns=prepared.dropped_turns,
            reused_tokens=reused,
            max_new_tokens=params.max_new_tokens,
            end_token_id=self.end_token_id,
        )

    def forget(self, cache: CacheKey) -> None:
        """Free the KV cache kept for a conversation, e.g. when it is deleted."""
        self.kv_cache.forget(cache)

    def _encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features ``(image_tokens, hidden)`` of the preprocessor's ``pixel_values``."""
        pixels = pixel_values.to(device=self.device, dtype=self._vision_dtype())
        return self.model.model.get_image_features(pixel_values=pixels).pooler_output[0]

    def _text_inputs(self, ids: list[int]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def model_image(self, photo: Photo) -> Image.Image:
        """The photo as the vision tower sees it: padded to a square and resized (384 px for Mipha-3B)."""
        return self.preprocessor.model_image(open_photo(photo))

    def _pixel_values(self, photo: Photo) -> torch.Tensor:
        return self.preprocessor(open_photo(photo)).to(device=self.device, dtype=self._vision_dtype())

    def _vision_dtype(self) -> torch.dtype:
        return self.model.model.vision_tower.embeddings.patch_embedding.weight.dtype

