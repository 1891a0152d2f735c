"""Event functions for the page: who is asking, then the handler, then what a person may see.

Every event the page sends goes through `owned` or `owned_stream`:
- the owner comes from the request (login cookie, OAuth session or the visitor cookie, see
  `app.access`), never from session state a replayed session hash could reuse;
- failures become one sentence for the person. Storage and core errors carry such a sentence
  already; anything unexpected is logged with its traceback and shown as a generic sentence,
  so SQL, paths, tracebacks and class names never reach the page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

import storage as db
from app.visitor import browser_secret
from mipha_core import MiphaError

log = logging.getLogger(__name__)

UNEXPECTED_FAILURE = (
    "Something went wrong on the server and this was not done. Try again in a moment; if it keeps "
    "happening, tell the person who runs this server (the details are in its log)."
)

OwnerResolver = Callable[[str | None, str | None, str | None], int | None]
"""(browser secret, login name, OAuth name) → owner id, or None when the request proves no one."""


def user_facing(error: Exception) -> gr.Error:
    """The `gr.Error` a person sees for `error`; unexpected errors are logged in full first."""
    if isinstance(error, db.StorageError | MiphaError):  # their messages are written for people
        log.warning("refused: %s", error, exc_info=error.__cause__ is not None)
        return gr.Error(str(error))
    log.error("unexpected failure in an event", exc_info=error)
    return gr.Error(UNEXPECTED_FAILURE)


def owned(resolve: OwnerResolver, handler: Callable[..., Any]) -> Callable[..., Any]:
    """An event function: the page's inputs → `handler(owner_id, *inputs)`."""

    def event(request: gr.Request, profile: gr.OAuthProfile | None, *values: Any) -> Any:
        try:
            return handler(_owner(resolve, request, profile), *values)
        except gr.Error:
            raise
        except Exception as error:
            raise user_facing(error) from error

    return event


def owned_stream(resolve: OwnerResolver, handler: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Like `owned`, for a generator handler (a streamed reply)."""

    def event(request: gr.Request, profile: gr.OAuthProfile | None, *values: Any) -> Iterator[Any]:
        try:
            yield from handler(_owner(resolve, request, profile), *values)
        except gr.Error:
            raise
        except Exception as error:
            raise user_facing(error) from error

    return event


def _owner(resolve: OwnerResolver, request: gr.Request | None, profile: gr.OAuthProfile | None) -> int | None:
    if request is None:
        return None
    oauth_username = profile.username if profile is not None else None
    return resolve(browser_secret(request.cookies), request.username, oauth_username)
