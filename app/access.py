"""Who is asking: decided once per event from the authenticated request, never from session state.

Gradio keeps per-session state (`gr.State`) by a session hash the client chooses and sends;
anyone who learns another visitor's hash could replay it. So no handler trusts an owner kept
in session state: every event resolves its owner here, from what the request proves.

- With `--auth`, the login name Gradio verified from its cookie (`request.username`).
- With Hugging Face OAuth, the signed-in account from the signed session cookie, else the browser.
- Otherwise the anonymous visitor: a random secret in an HttpOnly cookie (see `app.visitor`),
  a bearer credential like any session cookie.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import storage as db

log = logging.getLogger(__name__)

MIN_BROWSER_SECRET_CHARS = 32


@dataclass(frozen=True)
class Identity:
    """A verified identity: a login name, a Hugging Face account or a browser secret."""

    kind: Literal["login", "oauth", "browser"]
    name: str

    def __repr__(self) -> str:  # the browser secret is a credential: keep it out of logs
        shown = self.name if self.kind != "browser" else "…"
        return f"Identity({self.kind}, {shown})"


def identity_for(*, login_required: bool, username: str | None, oauth_username: str | None,
                 browser_secret: str | None) -> Identity | None:
    """The identity a request proves, or None when it proves none (then it may see nothing).

    With a login required, only the verified login name counts: a browser secret or a
    replayed session cannot stand in for it.
    """
    if login_required:
        return Identity("login", username) if username else None
    if oauth_username:
        return Identity("oauth", oauth_username)
    if isinstance(browser_secret, str) and len(browser_secret) >= MIN_BROWSER_SECRET_CHARS:
        return Identity("browser", browser_secret)
    return None


def owner_id_for(storage: db.Storage, identity: Identity | None) -> int | None:
    """The user row of `identity` (created on first sight); None for no identity."""
    if identity is None:
        return None
    with storage.session() as s:
        if identity.kind == "login":
            return db.user_for_password_login(s, username=identity.name).id
        if identity.kind == "oauth":
            return db.user_for_oauth(s, username=identity.name).id
        return db.user_for_browser_secret(s, secret=identity.name).id
