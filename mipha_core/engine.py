"""``Engine``: a loaded Mipha model that turns chat messages into inputs and streamed replies."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mipha_core.caching import ByteBoundedLRU, CacheKey, PrefixKVCache, image_key
from mipha_core.conversation import Turn, turns_from_messages
from mipha_core.errors import ContextOverflowError
from mipha_core.generation import CancelCriteria, CountingTextStreamer, GenerationParams, InvalidGenerationParamsError
from mipha_core.modeling import MiphaForConditionalGeneration
from mipha_core.preprocessing import ImagePreprocessor
from mipha_core.prompt import PhiPromptStyle
from mipha_core.streaming import ReplyStream

logger = logging.getLogger(__name__)

MIN_REPLY_TOKENS = 32
"""The shortest reply budget a question is answered with when a long question leaves less than asked."""


@dataclass(frozen=True)
class PreparedPrompt:
    """A conversation fitted into the context window, as token ids and the image to send."""

    token_ids: list[int]
    image: Image.Image | None
    dropped_turns: int
    max_new_tokens: int
    """The reply budget granted: what was asked, or less when a long question leaves less room."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def image_sent(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class CacheSettings:
    """Byte budgets of the follow-up caches; 0 turns a cache off (every turn re-reads everything)."""

    kv_cache_bytes: int = 2 * 1024**3
    image_feature_bytes: int = 128 * 1024**2
    """About 35 photos' projected features in bf16 (729 x 2560 values each)."""


class Engine:
    """A loaded Mipha model, its tokenizer and preprocessor, and the conversation rules.

    Conversation rules: the model sees at most ``context_length`` positions (the image takes
    ``image_tokens``); when a conversation does not fit with room for the reply, whole turns
    are dropped oldest first, the turn that carries the image last. If the newest turn alone
    leaves less room than asked, the reply budget shrinks, to ``MIN_REPLY_TOKENS`` at least;
    a question that leaves less is refused (``ContextOverflowError``). Mipha was trained with one
    image per conversation, so only the most recent image is sent, at the turn it came with;
    earlier images stay in the history but the model no longer sees them.
    """

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
        self.context_length = context_length
        self.image_tokens = image_tokens
        self.prompt_style = PhiPromptStyle()
        self.end_token_id = tokenizer.convert_tokens_to_ids(self.prompt_style.stop_text)
        self.image_token_id = model.config.image_token_id
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

    def encode(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """Tensors for ``model(**inputs)`` and ``model.generate(**inputs)``: ``input_ids``,
        ``attention_mask`` and, when an image is sent, ``pixel_values``. Turns that do not fit
        with ``max_new_tokens`` of room are dropped as described on the class."""
        prepared = self.prepare(messages, max_new_tokens=max_new_tokens)
        inputs = self._text_inputs(prepared.token_ids)
        if prepared.image is not None:
            inputs["pixel_values"] = self._pixel_values(prepared.image)
        return inputs

    def prepare(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int,
        min_new_tokens: int = MIN_REPLY_TOKENS,
    ) -> PreparedPrompt:
        """Fit ``messages`` into the context window; tokenizing only, the image is not touched.

        Cheap enough to check a question before storing it. Older turns are dropped (see the
        class) until the reply has ``max_new_tokens`` of room. If the newest turn alone leaves
        less, the reply gets what is left, down to ``min_new_tokens`` (or ``max_new_tokens`` if
        smaller); below that ``ContextOverflowError`` says how much the question is too long.
        """
        if max_new_tokens < 0 or min_new_tokens < 1:
            raise InvalidGenerationParamsError(
                f"max_new_tokens must be >= 0 and min_new_tokens >= 1, got {max_new_tokens} and {min_new_tokens}"
            )
        turns = turns_from_messages(messages)
        image_turn = _latest_image_turn(turns)
        kept, ids = self._fit(turns, image_turn=image_turn, room=max_new_tokens)
        image_sent = image_turn in kept
        shortest = min(min_new_tokens, max_new_tokens)
        if len(ids) + shortest > self.context_length:
            raise self._overflow(
                turns[-1].question, prompt_tokens=len(ids), image_sent=image_sent, reply_tokens=shortest
            )
        return PreparedPrompt(
            token_ids=ids,
            image=turns[image_turn].image if image_sent else None,
            dropped_turns=len(turns) - len(kept),
            max_new_tokens=min(max_new_tokens, self.context_length - len(ids)),
        )

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
    ) -> ReplyStream:
        """Start a reply to the last user message; iterate the result for text.

        The conversation is fitted as ``prepare`` does it, so a long question may get a reply
        budget below ``max_new_tokens`` (``ReplyStream.max_new_tokens`` says which). With
        ``cache``, the reply reuses the KV cache that conversation's previous reply left
        and the owner's cached photo features, and leaves its own for the next question;
        without, nothing is reused or kept. Raises ``ContextOverflowError`` here, before any
        generation, when the last question cannot fit. See ``ReplyStream`` for cancellation and
        for the figures in ``stats``.
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

    def _fit(self, turns: list[Turn], *, image_turn: int | None, room: int) -> tuple[list[int], list[int]]:
        """Drop turns until ``room`` positions follow the prompt or only the newest is left;
        returns the indices of the kept turns and the prompt's token ids."""
        kept = list(range(len(turns)))
        while True:
            sent_image_turn = kept.index(image_turn) if image_turn in kept else None
            ids = self._token_ids([turns[i] for i in kept], image_turn=sent_image_turn)
            if len(ids) + room <= self.context_length or len(kept) == 1:
                return kept, ids
            kept.remove(_turn_to_drop(kept, image_turn))

    def _overflow(
        self, question: str, *, prompt_tokens: int, image_sent: bool, reply_tokens: int
    ) -> ContextOverflowError:
        """The error for a question too long even alone; characters are estimated from its own tokens."""
        tokens_over = prompt_tokens + reply_tokens - self.context_length
        question_tokens = len(self.tokenizer(question, add_special_tokens=False).input_ids)
        characters_over = math.ceil(tokens_over * len(question) / max(question_tokens, 1))
        photo = f" with the photo (it takes {self.image_tokens} positions)" if image_sent else ""
        return ContextOverflowError(
            f"your question is about {tokens_over:,} tokens (roughly {characters_over:,} characters) too long "
            f"for the model's {self.context_length}-position window{photo}; shorten it",
            prompt_tokens=prompt_tokens,
            context_length=self.context_length,
            image_tokens=self.image_tokens if image_sent else 0,
            reply_tokens=reply_tokens,
            characters_over=characters_over,
        )

    def _token_ids(self, turns: list[Turn], *, image_turn: int | None) -> list[int]:
        """Tokenize each side of the image on its own, as the original code does."""
        prompt = self.prompt_style.render(turns, image_turn=image_turn)
        ids = self.tokenizer(prompt.before, add_special_tokens=False).input_ids
        if prompt.has_image:
            ids += [self.image_token_id] * self.image_tokens
            ids += self.tokenizer(prompt.after, add_special_tokens=False).input_ids
        return ids

    def _text_inputs(self, ids: list[int]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def _pixel_values(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessor(image).to(device=self.device, dtype=self._vision_dtype())

    def _vision_dtype(self) -> torch.dtype:
        return self.model.model.vision_tower.embeddings.patch_embedding.weight.dtype


def _turn_to_drop(kept: list[int], image_turn: int | None) -> int:
    """The oldest kept turn before the newest, the one carrying the image only when no other is left."""
    older = kept[:-1]
    without_image = [index for index in older if index != image_turn]
    return (without_image or older)[0]


def _latest_image_turn(turns: list[Turn]) -> int | None:
    """Index of the turn that carries the most recent image."""
    for index in range(len(turns) - 1, -1, -1):
        if turns[index].image is not None:
            return index
    return None
