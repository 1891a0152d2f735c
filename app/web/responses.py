"""The way out: security headers on every response, the page's nonce, and plain refusals."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.types import Message, Send

from app.api.errors import error_headers, error_json
from app.web.headers import CORS_HEADERS, add_nonce, content_security_policy, security_headers


@dataclass(frozen=True)
class Refusal:
    """An HTTP status and the one sentence a visitor sees."""

    status: int
    message: str
    code: str | None = None
    """A machine-readable reason, for the API's error JSON."""


class SecuredSend:
    """Wraps `send`: drops CORS grants, adds the security headers, puts a nonce into the page."""

    def __init__(self, send: Send, *, on_space: bool, page: bool, file: bool) -> None:
        self._send = send
        self._on_space = on_space
        self._page = page
        self._file = file
        self._held: Message | None = None
        self._body: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._start(message)
        elif message["type"] == "http.response.body" and self._held is not None:
            await self._buffer(message)
        else:
            await self._send(message)

    async def _start(self, message: Message) -> None:
        headers = MutableHeaders(scope=message)
        for name in CORS_HEADERS:
            del headers[name]
        if self._page and headers.get("content-type", "").startswith("text/html") \
                and "content-encoding" not in headers:
            self._held = message
            return
        self._secure(headers, nonce=None)
        await self._send(message)

    async def _buffer(self, message: Message) -> None:
        self._body.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        nonce = _nonce()
        page = add_nonce(b"".join(self._body), nonce)
        start, self._held = self._held, None
        headers = MutableHeaders(scope=start)
        headers["content-length"] = str(len(page))
        self._secure(headers, nonce=nonce)
        await self._send(start)
        await self._send({"type": "http.response.body", "body": page, "more_body": False})

    def _secure(self, headers: MutableHeaders, *, nonce: str | None) -> None:
        csp = content_security_policy(on_space=self._on_space, nonce=nonce, sandbox=self._file)
        for name, value in security_headers(on_space=self._on_space, csp=csp).items():
            headers[name] = value


async def respond(send: Send, refusal: Refusal, *, openai_format: bool = False) -> None:
    """Answer with the refusal's status and its one sentence: plain text, or OpenAI's error JSON
    for the `/v1` API, whose clients read that."""
    if openai_format:
        body = error_json(refusal.status, refusal.message, code=refusal.code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(name.encode(), value.encode()) for name, value in error_headers(refusal.status).items()]
    else:
        body = f"{refusal.message}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        if refusal.status in (429, 503):
            headers.append((b"retry-after", b"60"))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _nonce() -> str:
    return secrets.token_urlsafe(18)
