"""Persist a reply while it streams, so a crash loses at most about a second of it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType

from storage.db import Storage
from storage.errors import InvalidInputError, LimitExceededError, StorageError
from storage.messages import start_assistant_message, update_assistant_message
from storage.records import MessageRecord, MessageStatus

logger = logging.getLogger(__name__)

_FINAL_STATUSES = {
    MessageStatus.COMPLETE,
    MessageStatus.CANCELLED,
    MessageStatus.ERROR,
    MessageStatus.INTERRUPTED,
}


class ReplyWriter:
    """Grows one assistant message in the database, throttled.

    Each write is its own short unit of work, so the UI and other users are
    never blocked by a reply in progress. Use it from the thread that streams:

    .. code-block:: python

        with ReplyWriter.start(storage, owner_id=u.id, conversation_id=c.id) as writer:
            for chunk in generate(...):
                writer.append(chunk)
                yield writer.text
            writer.finish(finish_reason="stop", completion_tokens=n)

    Leaving the block without ``finish()`` records ``cancelled`` when the
    generator was closed (the user pressed stop), ``error`` when it raised,
    and ``complete`` otherwise.

    When the database cannot be written (disk full, locked past the busy
    timeout, read-only), ``append()``, ``flush()`` and ``finish()`` raise the
    :class:`~storage.errors.StorageUnavailableError` subclass rather than
    streaming on: a reply the person reads but the server never keeps would be
    lost silently. The caller should stop generating and show ``str(error)``;
    ``text`` still holds everything received. Leaving the block then tries once
    more to record the reply as ``error``; if that fails too, the reply stays
    ``partial`` and the next start-up marks it ``interrupted``.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        owner_id: int,
        message: MessageRecord,
        min_interval_s: float = 1.0,
        max_pending_tokens: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._storage = storage
        self._owner_id = owner_id
        self.message = message
        self._min_interval_s = min_interval_s
        self._max_pending_tokens = max_pending_tokens
        self._clock = clock
        self._chunks: list[str] = []
        self._length = 0
        self._pending_tokens = 0
        self._started = clock()
        self._last_flush = self._started
        self._first_token_s: float | None = None
        self._tokens = 0
        self.finished = False

    @classmethod
    def start(
        cls,
        storage: Storage,
        *,
        owner_id: int,
        conversation_id: str,
        min_interval_s: float = 1.0,
        max_pending_tokens: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> ReplyWriter:
        """Create the reply (status ``partial``, empty) and a writer for it.

        The reply answers the conversation's active leaf, which must be a
        question (see :func:`storage.start_assistant_message`).
        """
        with storage.session() as session:
            message = start_assistant_message(
                session, owner_id=owner_id, conversation_id=conversation_id, replica_id=storage.replica_id
            )
        return cls(
            storage,
            owner_id=owner_id,
            message=message,
            min_interval_s=min_interval_s,
            max_pending_tokens=max_pending_tokens,
            clock=clock,
        )

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    def append(self, chunk: str, *, tokens: int = 1) -> None:
        """Add streamed text; writes when ~``min_interval_s`` passed or enough tokens piled up.

        Raises a StorageUnavailableError subclass when that write fails (the
        chunk is kept in ``text``); see the class docstring.
        """
        if self.finished:
            raise InvalidInputError("This reply is already finished; start a new one.")
        limit = self._storage.limits.max_message_chars
        if self._length + len(chunk) > limit:
            raise LimitExceededError(
                f"The reply grew past {limit} characters and was stopped there.",
                limit_name="max_message_chars",
                limit=limit,
                actual=self._length + len(chunk),
            )
        if self._first_token_s is None:
            self._first_token_s = self._clock() - self._started
        self._chunks.append(chunk)
        self._length += len(chunk)
        self._tokens += tokens
        self._pending_tokens += tokens
        due = self._clock() - self._last_flush >= self._min_interval_s
        if due or self._pending_tokens >= self._max_pending_tokens:
            self.flush()

    def flush(self) -> MessageRecord:
        """Write the text so far (still ``partial``)."""
        self._write(status=MessageStatus.PARTIAL)
        return self.message

    def finish(
        self,
        *,
        status: MessageStatus = MessageStatus.COMPLETE,
        finish_reason: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        reused_tokens: int | None = None,
    ) -> MessageRecord:
        """Write the final text, status, token counts and timings."""
        if status not in _FINAL_STATUSES:
            raise InvalidInputError(f"A reply must finish with a final status, got {status!r}.")
        self._write(
            status=status,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=self._tokens if completion_tokens is None else completion_tokens,
            reused_tokens=reused_tokens,
            first_token_seconds=self._first_token_s,
            duration_seconds=self._clock() - self._started,
        )
        self.finished = True
        return self.message

    def _write(self, *, status: MessageStatus, **fields: object) -> None:
        with self._storage.session() as session:
            self.message = update_assistant_message(
                session,
                owner_id=self._owner_id,
                message_id=self.message.id,
                text=self.text,
                status=status,
                **fields,
            )
        self._pending_tokens = 0
        self._last_flush = self._clock()

    def __enter__(self) -> ReplyWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.finished:
            return
        if exc_type is None:
            self.finish()
            return
        if issubclass(exc_type, (GeneratorExit, KeyboardInterrupt, asyncio.CancelledError)):
            status, reason = MessageStatus.CANCELLED, "cancelled"
        else:
            logger.warning("reply %d ended with %s", self.message.id, exc_type.__name__)
            status, reason = MessageStatus.ERROR, "error"
        try:
            self.finish(status=status, finish_reason=reason)
        except StorageError:
            # The original exception is the one worth seeing (it propagates);
            # the reply stays partial and is marked interrupted at next start.
            logger.exception("could not record the end of reply %d", self.message.id)
