"""Generation parameters and the stopping/streaming hooks handed to ``model.generate``."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, TextIteratorStreamer

from mipha_core.errors import MiphaError

ORIGINAL_TOP_K = 50
"""The original demo sampled with transformers 4.37 defaults, which include top_k=50."""


class InvalidGenerationParamsError(MiphaError, ValueError):
    """A generation setting is out of range."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one reply. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidGenerationParamsError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 5.0:
            raise InvalidGenerationParamsError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidGenerationParamsError(f"top_p must be in (0, 1], got {self.top_p}")

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


class CancelCriteria(StoppingCriteria):
    """Stops generation at the next token once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
