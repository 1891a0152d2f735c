"""The ASGI middleware in front of Gradio: who may ask what, how much they may send, and the
security headers on every answer.

It runs outside Gradio's own middleware (see `app.web.install`), so Gradio's CORS middleware,
which grants credentialed access to other localhost origins, never has the last word.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import WRONG_KEY
from app.web import routes
from app.web.files import file_refusal_reason
from app.web.origin import is_loopback_host, is_same_origin
from app.web.policy import WebPolicy
from app.web.responses import Refusal, SecuredSend, respond
from app.web.uploads import BodyRefused, ClientGone, UploadBudget, part_counter, read_body, replay

log = logging.getLogger(__name__)

BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRONG_HOST = Refusal(421, "This server only answers at its local address.")
CROSS_ORIGIN = Refusal(403, "Requests from other websites are not allowed.")
NOT_FOUND = Refusal(404, "Not found.")
SIGN_IN = Refusal(401, "Sign in first.")
NO_FILE = Refusal(404, "This file is not available.")
TOO_LARGE = Refusal(413, "This request is too large.")
API_KEY = Refusal(401, WRONG_KEY.message, code=WRONG_KEY.code)
API_TOO_LARGE = Refusal(413, "This request is too large: the photo and the messages together exceed the limit.",
                        code="request_too_large")


class WebGuard:
    """Checks each request before Gradio sees it and secures each response on the way out."""

    def __init__(self, app: ASGIApp, *, policy: WebPolicy, photo_exists: Callable[[str], bool]) -> None:
        self.app = app
        self.policy = policy
        self.photo_exists = photo_exists
        self.budget = UploadBudget(per_minute=policy.uploads_per_minute, bytes_per_hour=policy.upload_bytes_per_hour,
                                   total_bytes_per_hour=policy.upload_total_bytes_per_hour)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket" and self._refusal(HTTPConnection(scope)) is not None:
            await send({"type": "websocket.close", "code": 1008})
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        connection = HTTPConnection(scope)
        send = SecuredSend(send, on_space=self.policy.on_space, page=_is_page(scope),
                           file=routes.requested_file(scope["path"]) is not None)
        try:
            refusal = self._refusal(connection)
            if refusal is None:
                receive = await self._read_body(connection, receive)
        except BodyRefused as e:
            refusal = e.refusal
        except ClientGone:
            return
        if refusal is not None:
            _log_refusal(connection, refusal)
            await respond(send, refusal, openai_format=routes.is_openai_api(scope["path"]))
            return
        if _is_page(scope):  # served uncompressed, so that the nonce can be written into it
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        await self.app(scope, receive, send)

    def _refusal(self, connection: HTTPConnection) -> Refusal | None:
        path = connection.scope["path"]
        if self.policy.local_only and not is_loopback_host(connection.headers):
            return WRONG_HOST
        if not is_same_origin(connection.headers):
            return CROSS_ORIGIN
        if routes.is_hidden(path, show_api=self.policy.show_api):
            return NOT_FOUND
        if routes.is_openai_api(path):  # a key instead of the login; checked before the body is read
            if not self.policy.api_keys.enabled:
                return NOT_FOUND
            return None if self.policy.api_keys.identify(connection.headers.get("authorization")) else API_KEY
        if self.policy.auth_required and routes.needs_login(path) and signed_in_user(connection) is None:
            return SIGN_IN
        requested = routes.requested_file(path)
        if requested is not None:
            reason = file_refusal_reason(requested, data_dir=self.policy.data_dir, temp_dir=self.policy.temp_dir,
                                         photo_exists=self.photo_exists)
            if reason is not None:
                log.debug("not serving %r: %s", requested[:200], reason)
                return NO_FILE
        return None

    async def _read_body(self, connection: HTTPConnection, receive: Receive) -> Receive:
        """The body read with its cap (upload limits on the upload route), ready to replay."""
        if connection.scope["method"] in BODYLESS_METHODS:
            return receive
        if connection.scope["path"] == routes.UPLOAD_PATH:
            return await self._read_upload(connection, receive)
        if connection.scope["path"] == routes.OPENAI_CHAT_PATH:
            limit = self.policy.max_api_body_bytes
            _check_claimed_length(connection.headers, limit, API_TOO_LARGE)
            return replay(await read_body(receive, limit=limit, too_large=API_TOO_LARGE), receive)
        _check_claimed_length(connection.headers, self.policy.max_request_bytes, TOO_LARGE)
        return replay(await read_body(receive, limit=self.policy.max_request_bytes, too_large=TOO_LARGE), receive)

    async def _read_upload(self, connection: HTTPConnection, receive: Receive) -> Receive:
        visitor = _visitor(connection, trust_forwarded=self.policy.on_space)
        refusal = self.budget.start(visitor)
        if refusal is not None:
            raise BodyRefused(refusal)
        limit, too_large = self._upload_limit(visitor)
        _check_claimed_length(connection.headers, limit, too_large)
        count_parts = part_counter(connection.headers.get("content-type", ""), max_parts=1)
        body = await read_body(receive, limit=limit, too_large=too_large, on_chunk=count_parts)
        self.budget.spend(visitor, len(body))
        return replay(body, receive)

    def _upload_limit(self, visitor: str) -> tuple[int, Refusal]:
        """The bytes this upload may have, and the refusal that names the limit it would break."""
        per_visitor, total = self.budget.bytes_left(visitor)
        size = self.policy.max_upload_body_bytes
        if total < size:
            return max(total, 0), Refusal(503, "The server has taken too many uploads this hour; try again later.")
        if per_visitor < size:
            return max(per_visitor, 0), Refusal(429, "You have uploaded too much this hour; try again later.")
        mb = self.policy.max_upload_bytes // (1024 * 1024)
        return size, Refusal(413, f"The photo is larger than the {mb} MB limit; use a smaller one.")


def signed_in_user(connection: HTTPConnection) -> str | None:
    """The user of the request's Gradio login cookie, or None.

    Mirrors `get_current_user` in gradio/routes.py: the cookie holds a token that the
    Gradio app maps to a user name.
    """
    app: Any = connection.scope.get("app")
    tokens = getattr(app, "tokens", None) or {}
    cookie_id = getattr(app, "cookie_id", None)
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        user = tokens.get(connection.cookies.get(name))
        if user is not None:
            return user
    return None


def _visitor(connection: HTTPConnection, *, trust_forwarded: bool) -> str:
    """Who the upload limits count against: the signed-in user, else the client address.

    On a Space every request comes through Hugging Face's proxy, which appends the client
    address to `X-Forwarded-For`; the last entry is the one the proxy wrote.
    """
    user = signed_in_user(connection)
    if user is not None:
        return f"user:{user}"
    forwarded = connection.headers.get("x-forwarded-for", "") if trust_forwarded else ""
    if forwarded.strip():
        return f"ip:{forwarded.split(',')[-1].strip()}"
    return f"ip:{connection.client.host if connection.client else 'unknown'}"


def _check_claimed_length(headers: Headers, limit: int, refusal: Refusal) -> None:
    claimed = headers.get("content-length", "")
    if claimed.isdigit() and int(claimed) > limit:
        raise BodyRefused(refusal)


def _is_page(scope: Scope) -> bool:
    return scope["method"] == "GET" and scope["path"] == "/"


def _log_refusal(connection: HTTPConnection, refusal: Refusal) -> None:
    scope = connection.scope
    if refusal is WRONG_HOST:
        log.warning("refused a request for host %r: a server on a loopback address answers only to local "
                    "names (against DNS rebinding); behind a proxy, start it with --host",
                    connection.headers.get("host"))
    level = logging.INFO if refusal.status in (413, 429, 503) else logging.DEBUG
    log.log(level, "refused %s %s: %d %s", scope["method"], scope["path"][:200], refusal.status, refusal.message)
