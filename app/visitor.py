"""The anonymous visitor's identity: a random secret in an HttpOnly cookie the server sets.

Each browser gets one on its first request. The database keeps only the secret's SHA-256.
An HttpOnly cookie is out of reach of page scripts, and it reaches the server with every
request, so the owner is taken from the request itself (see `app.access`) rather than from
a value the page sends back in an event. (Gradio's `BrowserState` would need its encryption
key served to every page to work, which makes the key worthless.)
"""

from __future__ import annotations

import re
import secrets
from http.cookies import CookieError, SimpleCookie
from typing import Any

COOKIE_NAME = "mipha-visitor"
MAX_AGE_SECONDS = 400 * 24 * 3600  # the longest lifetime browsers accept
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")

Scope = dict[str, Any]


def is_valid_secret(value: object) -> bool:
    return isinstance(value, str) and _SECRET.fullmatch(value) is not None


def browser_secret(cookies: Any) -> str | None:
    """The visitor secret among a request's cookies (a mapping with `.get`), if well formed."""
    value = cookies.get(COOKIE_NAME) if cookies is not None else None
    return value if is_valid_secret(value) else None


class VisitorCookieMiddleware:
    """Gives every browser without a valid visitor cookie a new one (ASGI middleware).

    The new cookie is also put into the request being served, so that first request already
    has its identity. `cross_site` is for pages framed by another site (a Hugging Face Space
    inside huggingface.co): the cookie then needs SameSite=None, Secure and Partitioned.
    """

    def __init__(self, app: Any, *, cross_site: bool = False) -> None:
        self.app = app
        self.cross_site = cross_site

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or browser_secret(request_cookies(scope)) is not None:
            await self.app(scope, receive, send)
            return
        secret = secrets.token_urlsafe(32)
        scope = {**scope, "headers": [*_without_cookie(scope["headers"]),
                                      (b"cookie", _joined_cookie(scope, secret).encode("latin-1"))]}
        set_cookie = self._set_cookie_header(secret, secure=_is_https(scope))

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", set_cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _set_cookie_header(self, secret: str, *, secure: bool) -> bytes:
        parts = [f"{COOKIE_NAME}={secret}", "Path=/", f"Max-Age={MAX_AGE_SECONDS}", "HttpOnly"]
        if self.cross_site:
            parts += ["Secure", "SameSite=None", "Partitioned"]
        else:
            parts += ["SameSite=Lax", *(["Secure"] if secure else [])]
        return "; ".join(parts).encode("latin-1")


def request_cookies(scope: Scope) -> dict[str, str]:
    """The cookies of an ASGI request (malformed headers skipped)."""
    jar: SimpleCookie = SimpleCookie()
    for name, value in scope["headers"]:
        if name == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except CookieError:  # a malformed header carries no usable identity
                continue
    return {key: morsel.value for key, morsel in jar.items()}


def _without_cookie(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name != b"cookie"]


def _joined_cookie(scope: Scope, secret: str) -> str:
    others = "; ".join(value.decode("latin-1") for name, value in scope["headers"] if name == b"cookie")
    return f"{others}; {COOKIE_NAME}={secret}" if others else f"{COOKIE_NAME}={secret}"


def _is_https(scope: Scope) -> bool:
    if scope.get("scheme") == "https":
        return True
    forwarded = dict(scope["headers"]).get(b"x-forwarded-proto", b"")
    return forwarded.split(b",")[0].strip().lower() == b"https"
