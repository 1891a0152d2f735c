"""Each Gradio session belongs to the browser that opened it.

Gradio keys a page's session (its state, its queue messages, its running events) by a
session hash the client makes up and sends; it checks a login where one is required, but not
that the session is the caller's own. So whoever learns another visitor's session hash could
listen to their replies (`/queue/data`), cancel them (`/cancel`), close their session
(`/heartbeat`) or run events in it (`/queue/join`, and `/run/predict` for the page's
unqueued events). This ASGI middleware binds every session
hash to the identity cookies (the visitor cookie of `app.visitor`, and the login's) of the first
request that uses it and refuses the hash from any other browser or person. It must run inside `VisitorCookieMiddleware`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs

from app.visitor import COOKIE_NAME, Scope, request_cookies
from app.web.responses import Refusal
from app.web.uploads import BodyRefused, ClientGone, read_body, replay

MAX_SESSIONS = 50_000
"""Bindings kept (the oldest go first); Gradio forgets a closed session's state within the hour."""
MAX_BODY_BYTES = 1 * 1024 * 1024
"""Largest JSON body read to find the session hash (a question is at most a few KiB)."""

_BODY_ROUTES = re.compile(r"/gradio_api/(queue/join|cancel|run/predict)/?$")
_QUERY_ROUTES = re.compile(r"/gradio_api/queue/data/?$")
_PATH_ROUTES = re.compile(r"/gradio_api/heartbeat/(?P<session>[^/]+)/?$")

LOGIN_COOKIE_PREFIXES = ("access-token", "session")
"""Gradio's login cookies (`access-token-<id>`, `access-token-unsecure-<id>`) and the OAuth session's."""

REFUSED_SESSION = "This page's session belongs to another browser. Reload the page to start your own."
REFUSED_BODY = "The request is too large."
TOO_LARGE = Refusal(413, REFUSED_BODY)


class SessionOwners:
    """session hash → the hash of the visitor cookie that first used it (bounded, thread-safe)."""

    def __init__(self, *, capacity: int = MAX_SESSIONS) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def claim(self, session_hash: str, visitor: str) -> bool:
        """True when `visitor` may use `session_hash`: it is theirs, or nobody's yet (now theirs)."""
        with self._lock:
            owner = self._owners.setdefault(session_hash, visitor)
            self._owners.move_to_end(session_hash)
            while len(self._owners) > self._capacity:
                self._owners.popitem(last=False)
        return owner == visitor


class SessionBindingMiddleware:
    """Refuses a session hash from any browser but the one that opened it (403)."""

    def __init__(self, app: Any, *, owners: SessionOwners | None = None) -> None:
        self.app = app
        self.owners = owners or SessionOwners()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/gradio_api/"):
            await self.app(scope, receive, send)
            return
        if _BODY_ROUTES.match(path) and scope["method"] == "POST":
            try:
                body = await read_body(receive, limit=MAX_BODY_BYTES, too_large=TOO_LARGE)
            except BodyRefused:
                await _refuse(send, 413, REFUSED_BODY)
                return
            except ClientGone:
                return
            receive = replay(body, receive)
            session_hash = _json_field(body, "session_hash")
        elif _QUERY_ROUTES.match(path):
            session_hash = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [None])[0]
        elif match := _PATH_ROUTES.match(path):
            session_hash = match["session"]
        else:
            await self.app(scope, receive, send)
            return
        if session_hash is not None and not self.owners.claim(str(session_hash), _visitor_key(scope)):
            await _refuse(send, 403, REFUSED_SESSION)
            return
        await self.app(scope, receive, send)


def _visitor_key(scope: Scope) -> str:
    """A digest of every cookie that says who is asking: the visitor cookie (always there:
    `VisitorCookieMiddleware` runs first), Gradio's login token and the OAuth session.

    With a login, the visitor cookie alone is not enough: another signed-in person who copied
    it (with the session hash) would otherwise be taken for the browser that opened the session.
    """
    cookies = request_cookies(scope)
    identity = sorted((name, value) for name, value in cookies.items()
                      if name == COOKIE_NAME or name.startswith(LOGIN_COOKIE_PREFIXES))
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def _json_field(body: bytes, name: str) -> Any:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value.get(name) if isinstance(value, dict) else None


async def _refuse(send: Any, status: int, sentence: str) -> None:
    payload = json.dumps({"detail": sentence}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
