"""``ReplyStream``: one reply generated on a worker thread and read as text chunks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from mipha_core.errors import MiphaError
from mipha_core.generation import CountingTextStreamer

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


class GenerationOutOfMemoryError(MiphaError):
    """The device ran out of memory while generating."""


@dataclass(frozen=True)
class ReplyStats:
    """What happened during one reply; available as ``ReplyStream.stats`` once iteration ends."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    max_new_tokens: int
    """The reply budget granted, which a long question can make smaller than the one asked for."""
    dropped_turns: int
    reused_tokens: int
    """Prompt tokens whose KV states came from an earlier turn's cache instead of a prefill."""
    vision_seconds: float | None
    """Time spent on the photo (decoding a stored one when its model input was not kept,
    preprocessing, the vision tower); None when no image was encoded (none sent, or cached)."""
    first_token_seconds: float | None
    elapsed_seconds: float

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed after the first token (None when fewer than two tokens came)."""
        if self.first_token_seconds is None or self.completion_tokens < 2:
            return None
        decode_time = self.elapsed_seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / decode_time if decode_time > 0 else None


class StreamedReply:
    """What a reply from any engine offers: iterate it for text, read ``stats`` once it has ended.

    ``cancel`` ends it early; ``prompt_tokens``, ``max_new_tokens`` (the reply budget granted),
    ``dropped_turns`` and ``reused_tokens`` are known before iteration starts. Subclasses set
    ``_iterator`` to their generator and ``_stats`` when it ends.
    """

    cancel: threading.Event
    prompt_tokens: int
    dropped_turns: int
    reused_tokens: int
    max_new_tokens: int
    _iterator: Iterator[str]
    _stats: ReplyStats | None = None

    def __iter__(self) -> Iterator[str]:
        return self._iterator

    def __next__(self) -> str:
        return next(self._iterator)

    @property
    def stats(self) -> ReplyStats:
        """Figures for the finished reply; raises if the reply has not been read to its end."""
        if self._stats is None:
            raise RuntimeError(f"{type(self).__name__}.stats is available once the stream has been read to its end")
        return self._stats

    def text(self) -> str:
        """Read the whole reply and return it."""
        return "".join(self)


class ReplyStream(StreamedReply):
    """Iterate for the reply's text; read ``stats`` afterwards.

    Generation runs on a worker thread started by the first ``next()``. Setting ``cancel``
    stops it at the next token; leaving the loop early (``break``, a closed generator, a
    disconnected client) sets ``cancel`` too and waits for the thread, so no work outlives
    the reader. An exception raised on the worker is re-raised to the reader.
    ``prompt_tokens``, ``max_new_tokens`` (the reply budget granted), ``dropped_turns`` and
    ``reused_tokens`` are known before iteration starts.
    """

    def __init__(
        self,
        *,
        run: Callable[[CountingTextStreamer], torch.Tensor],
        streamer: CountingTextStreamer,
        cancel: threading.Event,
        prompt_tokens: int,
        dropped_turns: int,
        reused_tokens: int,
        max_new_tokens: int,
        end_token_id: int,
    ) -> None:
        self._run = run
        self._streamer = streamer
        self.cancel = cancel
        self.prompt_tokens = prompt_tokens
        self.dropped_turns = dropped_turns
        self.reused_tokens = reused_tokens
        self.max_new_tokens = max_new_tokens
        self._end_token_id = end_token_id
        self._error: BaseException | None = None
        self._last_token: int | None = None
        self._iterator = self._generate()

    def _generate(self) -> Iterator[str]:
        started = time.perf_counter()
        worker = threading.Thread(target=self._work, name="mipha-generate", daemon=True)
        worker.start()
        leading = True
        try:
            for chunk in self._streamer:
                if leading:
                    chunk = chunk.lstrip()
                    leading = not chunk
                if chunk:
                    yield chunk
        finally:
            if worker.is_alive():
                self.cancel.set()
            worker.join()
        self._raise_worker_error()
        self._stats = self._finish(started)

    def _work(self) -> None:
        try:
            sequences = self._run(self._streamer)
            self._last_token = int(sequences[0, -1])
        except BaseException as error:  # noqa: BLE001 - handed to the reader thread, which re-raises it
            self._error = error
            self._streamer.end()

    def _raise_worker_error(self) -> None:
        error = self._error
        if error is None:
            return
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
            raise GenerationOutOfMemoryError(
                "ran out of memory while generating: start a new chat, lower max new tokens, "
                "or restart with --load-8bit or --load-4bit"
            ) from error
        raise error

    def _finish(self, started: float) -> ReplyStats:
        produced = self._streamer.generated_tokens
        if self._last_token == self._end_token_id:
            reason: FinishReason = "stop"
        elif produced >= self.max_new_tokens:
            reason = "length"
        else:
            reason = "cancelled"
        first = self._streamer.first_token_at
        return ReplyStats(
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=produced,
            max_new_tokens=self.max_new_tokens,
            dropped_turns=self.dropped_turns,
            reused_tokens=self.reused_tokens,
            vision_seconds=self._streamer.vision_seconds,
            first_token_seconds=None if first is None else first - started,
            elapsed_seconds=time.perf_counter() - started,
        )
