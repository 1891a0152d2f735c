"""The OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions`, on the app's own server.

A call is one turn through `app.turn` as a job in the app's `ReplyJobs`: the same fitting,
photo pipeline, queue and concurrency limit as the page. Nothing is stored. The job follows
the client: when it disconnects, the reply stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.api.errors import WRONG_KEY, ApiError
from app.api.keys import ApiKeys
from app.api.requests import ApiLimits, ChatRequest, parse_chat_request
from app.gpu import on_gpu
from app.model_slot import ModelNotReadyError, ModelState
from app.replies import ReplyJob, ReplyQueueFullError, ReplySnapshot
from app.services import Services
from app.settings import Settings
from app.turn import TurnFailure, TurnRequest, TurnResult, api_work
from mipha_core import CacheKey, ContextOverflowError, InvalidMessagesError

log = logging.getLogger(__name__)

API_OWNER = 0
"""Reply-job owner id of API calls: no stored person has it, so they never meet a page's job."""
QUIET_POLL_S = 0.5
"""How often a waiting call looks whether its client is still there."""
MAX_DECODING = 2
"""Requests decoding a photo at once; others wait their turn (a 40 MP photo takes ~160 MB)."""


def api_routes(services: Services) -> list[Route]:
    """The `/v1` routes; empty without `--api-key`, so that the API answers 404."""
    keys = ApiKeys(services.settings.api_keys)
    if not keys.enabled:
        return []
    api = _Api(services, keys)
    return [Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"])]


def served_model_name(settings: Settings) -> str:
    """The model's name in the API: a Hub id as it is, a local folder by its last part only."""
    if settings.model == "tiny":
        return "mipha-tiny"
    if settings.model.count("/") == 1 and not settings.model.startswith((".", "/", "~")):
        return settings.model
    return settings.model.rstrip("/").rsplit("/", 1)[-1] or "mipha"


class _Api:
    def __init__(self, services: Services, keys: ApiKeys) -> None:
        self.services = services
        self.keys = keys
        self.model_name = served_model_name(services.settings)
        self.decoding = asyncio.Semaphore(MAX_DECODING)
        settings = services.settings
        self.limits = ApiLimits(max_question_chars=settings.max_message_chars,
                                max_new_tokens=settings.max_new_tokens,
                                max_image_bytes=settings.max_upload_mb * 1024 * 1024,
                                max_image_pixels=services.storage.limits.max_image_pixels)

    async def models(self, request: Request) -> Response:
        if self.keys.identify(request.headers.get("authorization")) is None:
            return _error(WRONG_KEY)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "mipha-chat"}]})

    async def chat_completions(self, request: Request) -> Response:
        key = self.keys.identify(request.headers.get("authorization"))
        if key is None:
            return _error(WRONG_KEY)
        try:
            chat = await self._read(request)
            job = await self._start(chat, key=key)
        except ApiError as e:
            return _error(e)
        completion = _Completion(model=self.model_name)
        if chat.stream:
            return StreamingResponse(self._events(job, chat, completion), media_type="text/event-stream",
                                     headers={"cache-control": "no-store"})
        return await self._whole(request, job, completion)

    async def _read(self, request: Request) -> ChatRequest:
        body = await request.body()  # the guard has bounded its size already
        async with self.decoding:
            chat = await anyio.to_thread.run_sync(lambda: parse_chat_request(body, limits=self.limits))
        if chat.model not in (None, "", self.model_name):
            raise ApiError(404, f"The model {chat.model[:80]!r} is not served here; GET /v1/models lists the one "
                                "that is.", param="model", code="model_not_found")
        return chat

    async def _start(self, chat: ChatRequest, *, key: str) -> ReplyJob:
        try:
            engine = self.services.model.engine()
        except ModelNotReadyError:  # the page's sentence speaks of its text box; the cause stays in the log
            loading = self.services.model.status().state is ModelState.LOADING
            raise ApiError(503, "The model is still loading; try again in a minute." if loading else
                           "The model could not be loaded; the server's log says why.") from None
        try:
            await anyio.to_thread.run_sync(lambda: engine.prepare(chat.messages,
                                                                  max_new_tokens=chat.params.max_new_tokens))
        except ContextOverflowError as e:
            raise ApiError(400, f"The conversation does not fit: {e}.", param="messages",
                           code="context_length_exceeded") from None
        except InvalidMessagesError as e:
            raise ApiError(400, f"The messages cannot be answered: {e}.", param="messages") from None
        turn = TurnRequest(messages=chat.messages, params=chat.params, stop=chat.stop, seed=chat.seed,
                           cache=CacheKey(owner=f"api:{key}", conversation="v1"))  # a client resending its chat reuses it
        work = on_gpu(api_work(engine, turn), zero_gpu=self.services.settings.zero_gpu)
        try:
            return self.services.replies.start((API_OWNER, f"api-{uuid.uuid4().hex}"), work,
                                               notice_for=_failure_sentence,
                                               max_waiting=self.services.settings.api_queue)
        except ReplyQueueFullError as e:
            raise ApiError(429, str(e), code="queue_full") from None

    async def _events(self, job: ReplyJob, chat: ChatRequest, completion: _Completion) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, content chunks, the finish chunk, usage if asked, [DONE].

        When the client goes, Starlette cancels this generator at its next await (within
        `QUIET_POLL_S`), and the job is stopped on the way out.
        """
        sent = 0
        try:
            yield _sse(completion.chunk({"role": "assistant", "content": ""}))
            async for snapshot in _follow(job):
                if snapshot is None:
                    continue
                if len(snapshot.text) > sent:
                    yield _sse(completion.chunk({"content": snapshot.text[sent:]}))
                    sent = len(snapshot.text)
                if snapshot.done:
                    result = snapshot.outcome
                    if isinstance(result, TurnResult):
                        yield _sse(completion.chunk({}, finish_reason=_finish_reason(result)))
                        if chat.include_usage:
                            yield _sse(completion.usage_chunk(result))
                    else:
                        failure = _job_error(snapshot)
                        yield _sse(failure.body())
                    yield "data: [DONE]\n\n"
        finally:
            _stop_if_running(job)

    async def _whole(self, request: Request, job: ReplyJob, completion: _Completion) -> Response:
        try:
            async for snapshot in _follow(job):
                if snapshot is not None and snapshot.done:
                    if isinstance(snapshot.outcome, TurnResult):
                        return JSONResponse(completion.whole(snapshot.outcome))
                    return _error(_job_error(snapshot))
                if await request.is_disconnected():
                    log.info("API reply %s: the client left; stopping it", job.key[1])
                    return Response(status_code=499)
        finally:
            _stop_if_running(job)
        return _error(ApiError(500, "The reply ended without an answer; try again."))


class _Completion:
    """The response objects of one completion, which share its id, time and model."""

    def __init__(self, *, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def chunk(self, delta: dict[str, Any], *, finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def usage_chunk(self, result: TurnResult) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": _usage(result)}

    def whole(self, result: TurnResult) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": _finish_reason(result), "logprobs": None}],
                "usage": _usage(result)}


def _usage(result: TurnResult) -> dict[str, Any]:
    stats = result.stats
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def _finish_reason(result: TurnResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


async def _follow(job: ReplyJob) -> AsyncIterator[ReplySnapshot | None]:
    """The job's snapshots as they change, and None after each `QUIET_POLL_S` without change.

    The blocking wait runs on a worker thread that always returns within `QUIET_POLL_S`, so a
    cancelled caller is never held longer than that.
    """
    snapshots = _snapshots(job)
    try:
        while True:
            snapshot = await anyio.to_thread.run_sync(next, snapshots, _END)
            if snapshot is _END:
                return
            yield snapshot
    finally:
        snapshots.close()


_END: Any = object()


def _snapshots(job: ReplyJob) -> Iterator[ReplySnapshot | None]:
    while True:
        for snapshot in job.listen(min_interval_s=0.02, timeout_s=QUIET_POLL_S):
            yield snapshot
            if snapshot.done:
                return
        yield None


def _stop_if_running(job: ReplyJob) -> None:
    if not job.done:
        log.info("API reply %s: the client left; stopping it", job.key[1])
        job.cancel.set()


def _job_error(snapshot: ReplySnapshot) -> ApiError:
    failure = snapshot.outcome
    if isinstance(failure, TurnFailure):
        return ApiError(503 if failure.engine_unavailable else 500, failure.message)
    if snapshot.notice:
        return ApiError(500, snapshot.notice)
    return ApiError(500, "The reply stopped before it started; try again.")


def _failure_sentence(_error: BaseException) -> str:
    """What an API client is told when the turn fails unexpectedly; the traceback is in the log."""
    return "The server failed while answering; try again. The server log has the details."


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())
