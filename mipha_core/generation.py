"""Generation parameters and the stopping/streaming hooks handed to ``model.generate``."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mipha_core.errors import MiphaError

ORIGINAL_TOP_K = 50
"""The original demo sampled with transformers 4.37 defaults, which include top_k=50."""


class InvalidGenerationParamsError(MiphaError, ValueError):
    """A generation setting is out of range."""


TEMPERATURE_RANGE = (0.0, 2.0)
"""What a reply may be sampled with, the same range as OpenAI's API; 0 is greedy."""
TOP_P_RANGE = (0.05, 1.0)
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one reply. ``temperature == 0`` means greedy decoding.

    The ranges here are the only generation bounds: the page's sliders and stored
    per-conversation settings use them too.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidGenerationParamsError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        low, high = TEMPERATURE_RANGE
        if not low <= self.temperature <= high:
            raise InvalidGenerationParamsError(f"temperature must be in [{low:g}, {high:g}], got {self.temperature}")
        low, high = TOP_P_RANGE
        if not low <= self.top_p <= high:
            raise InvalidGenerationParamsError(f"top_p must be in [{low:g}, {high:g}], got {self.top_p}")

    @classmethod
    def clamped(cls, temperature: object, top_p: object, max_new_tokens: object, *, limit: int) -> GenerationParams:
        """Values from a page or a database brought within the bounds; defaults for junk.

        ``limit`` is the server's cap on reply length (``--max-new-tokens``).
        """
        try:
            values = (float(temperature), float(top_p), int(max_new_tokens))  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return cls(max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, limit))
        if not all(math.isfinite(v) for v in values):
            return cls(max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, limit))
        return cls(temperature=_clamp(values[0], TEMPERATURE_RANGE), top_p=_clamp(values[1], TOP_P_RANGE),
                   max_new_tokens=min(max(int(values[2]), 1), limit))

    def as_dict(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}

    def to_generation_config(self, *, end_token_id: int, suppressed_ids: list[int]) -> GenerationConfig:
        """A complete config, so nothing leaks in from a checkpoint's defaults."""
        sampling = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            temperature=self.temperature if sampling else None,
            top_p=self.top_p if sampling else None,
            top_k=ORIGINAL_TOP_K if sampling else None,
            eos_token_id=end_token_id,
            pad_token_id=end_token_id,
            suppress_tokens=suppressed_ids or None,
            use_cache=True,
            return_dict_in_generate=True,
        )


    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def warpers(self) -> LogitsProcessorList:
        """Temperature, top-k and top-p, in the order ``generate`` applies them when sampling."""
        warpers = LogitsProcessorList([TemperatureLogitsWarper(self.temperature), TopKLogitsWarper(ORIGINAL_TOP_K)])
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


class TokenSampler:
    """Picks each next token from raw logits the way ``generate`` does with ``to_generation_config``:
    suppressed rows never win; greedy at temperature 0, otherwise a draw from the tempered, top-k,
    top-p distribution, from a generator of its own when ``seed`` is given."""

    def __init__(self, params: GenerationParams, *, suppressed_ids: list[int], seed: int | None = None) -> None:
        self.params = params
        self._suppressed = torch.tensor(suppressed_ids, dtype=torch.long)
        self._warpers = params.warpers() if params.sampling else None
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._no_ids = torch.zeros((1, 0), dtype=torch.long)

    def __call__(self, logits: torch.Tensor) -> int:
        scores = logits.float().reshape(1, -1).clone()
        scores[0, self._suppressed] = float("-inf")
        if self._warpers is None:
            return int(scores.argmax())
        scores = self._warpers(self._no_ids, scores)
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, num_samples=1, generator=self._generator))


class CancelCriteria(StoppingCriteria):
    """Stops generation at the next token once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class SeededChoice(LogitsProcessor):
    """Draws the next token from the tempered, top-k, top-p distribution with a generator of its
    own, then leaves only that token possible, so the library's sampler must pick it.

    The library samples from torch's global generator, which concurrent replies share; with
    this processor, a reply's tokens depend on its seed alone. ``generate`` runs a caller's
    processors before its own warpers, so this one applies them itself first.
    """

    def __init__(self, seed: int, params: GenerationParams) -> None:
        self.seed = seed
        self._warpers = params.warpers()
        self._generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._generator is None or self._generator.device != scores.device:
            self._generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probabilities = torch.softmax(self._warpers(input_ids, scores.float()), dim=-1)
        chosen = torch.multinomial(probabilities, num_samples=1, generator=self._generator)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter(-1, chosen, 0.0)


class CountingTextStreamer(TextIteratorStreamer):
    """``TextIteratorStreamer`` that also records how many tokens came, when the first did,
    and how long the vision tower took (None when the image features came from the cache)."""

    def __init__(self, tokenizer, **kwargs) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.generated_tokens = 0
        self.first_token_at: float | None = None
        self.vision_seconds: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.generated_tokens += value.numel()
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        super().put(value)


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])
