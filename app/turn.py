"""One turn, from a question to a reply: the one path the page and the `/v1` API both take.

`run_turn` fits the conversation, streams from the engine and applies stop sequences; the page's
job (`reply_work`) stores the question's reply as it grows, the API's job (`api_work`) only
publishes it. Both run as jobs in `app.replies.ReplyJobs`, so they share one queue and one limit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import storage as db
from app.chat_view import model_messages
from app.page_view import Notice
from app.replies import ReplyJob
from mipha_core import (
    CacheKey,
    ContextOverflowError,
    Engine,
    GenerationParams,
    MiphaError,
    RemoteEngineError,
    ReplyStats,
)
from mipha_core.images import load_image
from mipha_core.photos import StoredPhoto
from mipha_core.streaming import StreamedReply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnRequest:
    """What one reply is asked with, whoever asks."""

    messages: Sequence[dict[str, Any]]
    """Chat messages in mipha_core's format, ending with the question."""
    params: GenerationParams
    cache: CacheKey | None = None
    stop: tuple[str, ...] = ()
    """Texts that end the reply where they first appear; they are not part of it."""
    seed: int | None = None


@dataclass(frozen=True)
class TurnResult:
    """The reply's whole text and how it ended."""

    text: str
    stats: ReplyStats
    finish_reason: str = field(default="stop")
    """"stop" (the model ended, or a stop sequence), "length" or "cancelled"."""


def start_turn(engine: Engine, request: TurnRequest, *, cancel: threading.Event) -> StreamedReply:
    """The engine's reply to the request, not yet read; ``ContextOverflowError`` when the question cannot fit."""
    params = request.params
    return engine.stream(request.messages, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                         top_p=params.top_p, cancel=cancel, cache=request.cache, seed=request.seed)


def run_turn(stream: StreamedReply, request: TurnRequest, *, cancel: threading.Event,
             on_text: Callable[[str, str], None]) -> TurnResult:
    """Read the reply started by `start_turn`, calling ``on_text(piece, text_so_far)`` as it grows.

    Raises the engine's ``MiphaError`` when generation fails midway (``on_text`` has had what came).
    """
    stops = StopSequences(request.stop)
    with closing(iter(stream)) as chunks:  # an early exit waits for the generation to end
        for chunk in chunks:
            piece = stops.feed(chunk)
            if piece:
                on_text(piece, stops.text)
            if stops.hit:  # the engine stops at its next token; what it still sends is dropped
                cancel.set()
    if not stops.hit and (rest := stops.flush()):
        on_text(rest, stops.text)
    stats = stream.stats
    return TurnResult(text=stops.text, stats=stats, finish_reason="stop" if stops.hit else stats.finish_reason)


class StopSequences:
    """Cuts a streamed text at the first stop sequence, holding back what might begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.text = ""
        self.hit = False
        self._held = ""

    def feed(self, chunk: str) -> str:
        """The part of ``chunk`` that is certainly reply text, given everything so far."""
        if self.hit:
            return ""
        if not self.stops:
            self.text += chunk
            return chunk
        pending = self._held + chunk
        found = [index for stop in self.stops if (index := pending.find(stop)) >= 0]
        if found:
            self.hit = True
            piece, self._held = pending[:min(found)], ""
        else:
            keep = max((n for stop in self.stops for n in range(1, len(stop)) if pending.endswith(stop[:n])),
                       default=0)
            piece, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += piece
        return piece

    def flush(self) -> str:
        """What was held back, once the reply has ended without a stop sequence."""
        piece, self._held = self._held, ""
        self.text += piece
        return piece


@dataclass(frozen=True)
class ReplyOutcome:
    """How a page's reply ended, for the person: a notice when something is worth saying."""

    notice: Notice | None = None


def cache_key(owner_id: int, conversation_id: str) -> CacheKey:
    """Caches are kept per conversation and shared only among one person's conversations."""
    return CacheKey(owner=str(owner_id), conversation=conversation_id)


@dataclass(frozen=True)
class TurnFailure:
    """A turn that failed midway, in a sentence; ``engine_unavailable`` when another try may work."""

    message: str
    engine_unavailable: bool = False


def api_work(engine: Engine, request: TurnRequest) -> Callable[[ReplyJob], TurnResult | TurnFailure]:
    """The job that answers an API call: published as it grows, stored nowhere."""

    def work(job: ReplyJob) -> TurnResult | TurnFailure:
        try:
            stream = start_turn(engine, request, cancel=job.cancel)
            result = run_turn(stream, request, cancel=job.cancel, on_text=lambda _piece, text: job.publish(text))
        except MiphaError as e:
            log.warning("API reply %s failed: %s", job.key[1], e)
            return TurnFailure(_sentence(str(e)), engine_unavailable=isinstance(e, RemoteEngineError))
        log.info("API reply %s: %s after %d tokens", job.key[1], result.finish_reason, result.stats.completion_tokens)
        return result

    return work


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def stored_photo(storage: db.Storage, sha256: str) -> StoredPhoto:
    """The stored photo, decoded from its file only if the engine needs its pixels (its caches
    usually cover a follow-up); a file gone by then raises ``storage.ImageNotFoundError``."""
    return StoredPhoto(key=sha256, open=lambda: load_image(db.image_path(storage, sha256)))


def reply_work(storage: db.Storage, engine: Engine, *, owner_id: int, conversation_id: str,
               params: GenerationParams) -> Callable[[ReplyJob], ReplyOutcome]:
    """The job that answers the conversation's last question (on the active branch)."""

    def work(job: ReplyJob) -> ReplyOutcome:
        with storage.session() as s:
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
        if not records or records[-1].role is not db.Role.USER:
            return ReplyOutcome()
        messages = model_messages(records, photo=lambda sha256: stored_photo(storage, sha256))
        request = TurnRequest(messages=messages, params=params, cache=cache_key(owner_id, conversation_id))
        try:
            stream = start_turn(engine, request, cancel=job.cancel)
        except ContextOverflowError as e:  # the question stays: the person can edit it shorter
            return ReplyOutcome(Notice(f"{e} Edit the question to shorten it, or start a new chat."))
        with db.ReplyWriter.start(storage, owner_id=owner_id, conversation_id=conversation_id) as writer:
            job.publish("", message_id=writer.message.id)

            def store(piece: str, _text: str) -> None:
                writer.append(piece)
                job.publish(writer.text)

            try:
                result = run_turn(stream, request, cancel=job.cancel, on_text=store)
            except (MiphaError, db.ImageNotFoundError) as e:  # e.g. out of memory, the model server gone,
                # or the photo's file gone when the model had to look at it again: keep what came, say why
                writer.finish(status=db.MessageStatus.ERROR, finish_reason="error")
                return ReplyOutcome(Notice(str(e)))
            except db.LimitExceededError as e:
                job.cancel.set()
                writer.finish(status=db.MessageStatus.COMPLETE, finish_reason="length")
                return ReplyOutcome(Notice(str(e), "warning"))
            except db.StorageUnavailableError as e:  # the writer records the failure on its way out, if it can
                job.cancel.set()
                return ReplyOutcome(Notice(str(e)))
            stats = result.stats
            cancelled = result.finish_reason == "cancelled"
            writer.finish(status=db.MessageStatus.CANCELLED if cancelled else db.MessageStatus.COMPLETE,
                          finish_reason=result.finish_reason, prompt_tokens=stats.prompt_tokens,
                          completion_tokens=stats.completion_tokens, reused_tokens=stats.reused_tokens)
        if not cancelled and len(records) == 1:  # a photo sent alone: its first reply names the conversation
            with storage.session() as s:
                db.title_photo_conversation(s, owner_id=owner_id, conversation_id=conversation_id,
                                            reply_text=writer.text)
        return ReplyOutcome()

    return work
