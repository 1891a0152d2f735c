"""One turn, from a stored question to a stored reply: the work a reply job runs on its own thread.

The page (and later the API) starts it through `app.replies.ReplyJobs`; listeners see the text
grow through the job. The reply is written to storage as it grows, so a reload finds it there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

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
)
from mipha_core.images import load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplyOutcome:
    """How a reply ended, for the person: a notice when something is worth saying."""

    notice: Notice | None = None


def cache_key(owner_id: int, conversation_id: str) -> CacheKey:
    """Caches are kept per conversation and shared only among one person's conversations."""
    return CacheKey(owner=str(owner_id), conversation=conversation_id)


def reply_work(storage: db.Storage, engine: Engine, *, owner_id: int, conversation_id: str,
               params: GenerationParams) -> Callable[[ReplyJob], ReplyOutcome]:
    """The job that answers the conversation's last question (on the active branch)."""

    def work(job: ReplyJob) -> ReplyOutcome:
        with storage.session() as s:
            records = db.list_messages(s, owner_id=owner_id, conversation_id=conversation_id)
        if not records or records[-1].role is not db.Role.USER:
            return ReplyOutcome()
        messages = model_messages(records, load_image=lambda sha256: load_image(db.image_path(storage, sha256)))
        try:
            stream = engine.stream(messages, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                   top_p=params.top_p, cancel=job.cancel, cache=cache_key(owner_id, conversation_id))
        except ContextOverflowError as e:  # the question stays: the person can edit it shorter
            return ReplyOutcome(Notice(f"{e} Edit the question to shorten it, or start a new chat."))
        with db.ReplyWriter.start(storage, owner_id=owner_id, conversation_id=conversation_id) as writer, \
                closing(iter(stream)) as chunks:  # an early exit waits for the generation thread to end
            job.publish("", message_id=writer.message.id)
            try:
                for chunk in chunks:
                    writer.append(chunk)
                    job.publish(writer.text)
            except MiphaError as e:  # e.g. out of memory on the device: keep what came, say why
                writer.finish(status=db.MessageStatus.ERROR, finish_reason="error")
                return ReplyOutcome(Notice(str(e)))
            except db.LimitExceededError as e:
                job.cancel.set()
                writer.finish(status=db.MessageStatus.COMPLETE, finish_reason="length")
                return ReplyOutcome(Notice(str(e), "warning"))
            except db.StorageUnavailableError as e:  # the writer records the failure on its way out, if it can
                job.cancel.set()
                return ReplyOutcome(Notice(str(e)))
            stats = stream.stats
            cancelled = stats.finish_reason == "cancelled"
            writer.finish(status=db.MessageStatus.CANCELLED if cancelled else db.MessageStatus.COMPLETE,
                          finish_reason=stats.finish_reason, prompt_tokens=stats.prompt_tokens,
                          completion_tokens=stats.completion_tokens, reused_tokens=stats.reused_tokens)
        if not cancelled and len(records) == 1:  # a photo sent alone: its first reply names the conversation
            with storage.session() as s:
                db.title_photo_conversation(s, owner_id=owner_id, conversation_id=conversation_id,
                                            reply_text=writer.text)
        return ReplyOutcome()

    return work
