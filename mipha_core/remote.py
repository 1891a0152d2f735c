"""``RemoteEngine``: any OpenAI-compatible server as the model (vLLM, another Mipha Chat, ...).

The conversation is fitted here with Mipha's own tokenizer and rules (``PromptFitter``), so the
server gets the turns that fit and the photo already padded and resized to the tower's size:
every backend sees the same 384-px pixels. A stored photo is decoded when the reply is first
read, not when it is asked for. The reply is streamed; Stop shuts the connection,
which is how an OpenAI-compatible server learns to stop generating.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
from PIL import Image

from mipha_core.caching import CacheKey
from mipha_core.conversation import Turn
from mipha_core.errors import MiphaError
from mipha_core.fitting import MIN_REPLY_TOKENS, FittedEngine, PreparedPrompt, PromptFitter
from mipha_core.generation import GenerationParams
from mipha_core.photos import Photo, open_photo
from mipha_core.preprocessing import ImagePreprocessor
from mipha_core.streaming import FinishReason, ReplyStats, StreamedReply

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05


class RemoteEngineError(MiphaError):
    """The model server could not answer: unreachable, refused the key, busy, or timed out."""


@dataclass(frozen=True)
class RemoteServer:
    """Where the model runs and how to reach it."""

    url: str
    """The API base, e.g. ``http://gpu-box:8000/v1``."""
    api_key: str | None = None
    model: str | None = None
    """The served model's name; None: the first one the server lists."""
    timeout_s: float = 120.0
    """The longest wait for the next piece of a reply (the first one includes reading the prompt)."""

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc or self.url


class RemoteEngine(FittedEngine):
    """The ``Engine`` interface (prepare / stream / forget) over an OpenAI-compatible server."""

    def __init__(self, *, server: RemoteServer, fitter: PromptFitter, preprocessor: ImagePreprocessor,
                 model_id: str) -> None:
        self.server = server
        self.fitter = fitter
        self.preprocessor = preprocessor
        self.model_id = model_id
        self._client = openai.OpenAI(
            base_url=server.url, api_key=server.api_key or "none", max_retries=0,
            timeout=httpx.Timeout(server.timeout_s, connect=10.0),
        )
        self._served_model = server.model
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return f"remote {self.server.host}"

    @property
    def label(self) -> str:
        return f"{self._served_model or self.model_id} · remote · {self.server.host}"

    def model_image(self, photo: Photo) -> Image.Image:
        return self.preprocessor.model_image(open_photo(photo))

    def stream(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int = 512, temperature: float = 0.2,
               top_p: float = 1.0, cancel: threading.Event | None = None, cache: CacheKey | None = None,
               min_new_tokens: int = MIN_REPLY_TOKENS, seed: int | None = None) -> RemoteReply:
        """Start a reply on the server; iterate the result for text. ``cache`` is the server's
        business (vLLM keeps prefixes itself) and is not used here."""
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        prepared = self.prepare(messages, max_new_tokens=params.max_new_tokens, min_new_tokens=min_new_tokens)

        def request() -> dict[str, Any]:
            return {
                "messages": self._openai_messages(prepared),
                "max_tokens": prepared.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "stream": True,
                "stream_options": {"include_usage": True},
                **({"seed": seed} if seed is not None else {}),
            }

        return RemoteReply(open_stream=lambda: self._open(request()), prepared=prepared,
                           cancel=cancel or threading.Event())

    def forget(self, cache: CacheKey) -> None:
        """Nothing is kept here for a conversation."""

    def _openai_messages(self, prepared: PreparedPrompt) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if prepared.system is not None:
            messages.append({"role": "system", "content": prepared.system})
        for turn in prepared.turns:
            messages.append({"role": "user", "content": self._user_content(turn)})
            if turn.answer is not None:
                messages.append({"role": "assistant", "content": turn.answer})
        return messages

    def _user_content(self, turn: Turn) -> str | list[dict[str, Any]]:
        if turn.image is None:
            return turn.question
        return [{"type": "image_url", "image_url": {"url": png_data_uri(self.model_image(turn.image))}},
                {"type": "text", "text": turn.question}]

    def _open(self, request: dict[str, Any]) -> openai.Stream:
        with describe_failures(self.server):
            return self._client.chat.completions.create(model=self._model_name(), **request)

    def _model_name(self) -> str:
        """``--engine-model``, else the first model the server lists (asked once)."""
        with self._lock:
            if self._served_model is None:
                listed = [model.id for model in self._client.models.list()]
                if not listed:
                    raise RemoteEngineError(f"the model server at {self.server.host} serves no model: "
                                            "check that it has finished loading, or give --engine-model")
                self._served_model = listed[0]
                log.info("the model server at %s serves %s", self.server.host, ", ".join(listed))
            return self._served_model


class RemoteReply(StreamedReply):
    """One reply streamed from the server: iterate for text, read ``stats`` afterwards.

    Behaves as ``ReplyStream`` does: setting ``cancel`` or leaving the loop early ends the
    reply; here that shuts the connection, so the server stops generating too.
    """

    def __init__(self, *, open_stream: Callable[[], openai.Stream], prepared: PreparedPrompt,
                 cancel: threading.Event) -> None:
        self._open_stream = open_stream
        self.cancel = cancel
        self.prompt_tokens = prepared.prompt_tokens
        self.dropped_turns = prepared.dropped_turns
        self.reused_tokens = 0
        self.max_new_tokens = prepared.max_new_tokens
        self._iterator = self._generate()

    def _generate(self) -> Iterator[str]:
        started = time.perf_counter()
        first_at: float | None = None
        chunks = 0
        reason: FinishReason | None = None
        usage = None
        stream = self._open_stream()
        ended = threading.Event()
        watcher = threading.Thread(target=_close_on_cancel, args=(stream, self.cancel, ended),
                                   name="remote-reply-cancel", daemon=True)
        watcher.start()
        leading = True
        try:
            for chunk in _chunks(stream, self.cancel):
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    reason = _finish_reason(choice.finish_reason) or reason
                    text = (choice.delta.content or "") if choice.delta else ""
                    if leading:
                        text = text.lstrip()
                        leading = not text
                    if text:
                        chunks += 1
                        first_at = first_at or time.perf_counter()
                        yield text
                if self.cancel.is_set():
                    break
        finally:
            ended.set()
            if reason is None:
                self.cancel.set()  # a reader that left early: the server must stop too
            stream.close()
            watcher.join()
        if self.cancel.is_set() and reason is None:
            reason = "cancelled"
        if usage is not None:
            details = getattr(usage, "prompt_tokens_details", None)
            self.reused_tokens = getattr(details, "cached_tokens", None) or 0
        self._stats = ReplyStats(
            finish_reason=reason or "stop",
            prompt_tokens=usage.prompt_tokens if usage is not None else self.prompt_tokens,
            completion_tokens=usage.completion_tokens if usage is not None else chunks,
            max_new_tokens=self.max_new_tokens,
            dropped_turns=self.dropped_turns,
            reused_tokens=self.reused_tokens,
            vision_seconds=None,
            first_token_seconds=None if first_at is None else first_at - started,
            elapsed_seconds=time.perf_counter() - started,
        )


def _chunks(stream: openai.Stream, cancel: threading.Event) -> Iterator[Any]:
    """The stream's chunks; a connection shut by Stop ends it quietly, other failures are explained."""
    iterator = iter(stream)
    while True:
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        except (httpx.HTTPError, openai.APIError) as error:
            if cancel.is_set():
                return
            raise RemoteEngineError(
                "the connection to the model server broke off in the middle of the reply: try again"
            ) from error
        yield chunk


def _finish_reason(value: str | None) -> FinishReason | None:
    if value is None:
        return None
    return "length" if value == "length" else "stop"


def _close_on_cancel(stream: openai.Stream, cancel: threading.Event, ended: threading.Event) -> None:
    """Shut the connection as soon as ``cancel`` is set, even while a read is blocked on it.

    Closing a socket from another thread does not wake a blocked read; shutting it down does,
    and the server sees the connection end.
    """
    while not ended.is_set():
        if cancel.wait(CANCEL_POLL_S):
            network = stream.response.extensions.get("network_stream")
            sock = network.get_extra_info("socket") if network is not None else None
            if isinstance(sock, socket.socket):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed by the other side
                    pass
            return


@contextmanager
def describe_failures(server: RemoteServer) -> Iterator[None]:
    """The client's errors as sentences that say what to check; the original goes to the log."""
    try:
        yield
    except (openai.OpenAIError, httpx.HTTPError) as error:
        log.warning("model server at %s: %r", server.url, error)
        raise RemoteEngineError(_sentence(error, server)) from error


def _sentence(error: BaseException, server: RemoteServer) -> str:
    host = server.host
    if isinstance(error, openai.APITimeoutError):
        return f"the model server at {host} did not answer in time: it may be overloaded; try again in a moment"
    if isinstance(error, openai.APIConnectionError):
        return f"could not reach the model server at {host}: check that it is running and that --engine-url is right"
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return f"the model server at {host} refused this app's key: check --engine-api-key"
    if isinstance(error, openai.NotFoundError):
        return (f"the model server at {host} has no model {server.model or ''} at that address: "
                "check --engine-url (it usually ends in /v1) and --engine-model")
    if isinstance(error, openai.RateLimitError) or getattr(error, "status_code", None) == 503:
        return f"the model server at {host} is busy: try again in a moment"
    if isinstance(error, openai.BadRequestError):
        return f"the model server at {host} refused this question: the server log at {host} says why"
    return f"the model server at {host} failed to answer: try again, or see its log"


def png_data_uri(image: Image.Image) -> str:
    """``image`` as a lossless ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
