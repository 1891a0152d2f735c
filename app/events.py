"""Event functions for the page: who is asking, then the handler, then what a person may see.

Every event the page sends goes through `owned` or `owned_stream`:
- the handler returns a `PageView` (what changes), rendered into component updates in one place;
- the owner comes from the request (login cookie, OAuth session or the visitor cookie, see
  `app.access`), never from session state a replayed session hash could reuse;
- failures become one sentence for the person. Storage and core errors carry such a sentence
  already; anything unexpected is logged with its traceback and shown as a generic sentence,
  so SQL, paths, tracebacks and class names never reach the page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import gradio as gr

import storage as db
from app.page_view import Notice, PageView
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


class Refused(Exception):
    """An expected refusal (empty message, bad photo, no model…): shown by the composer, nothing lost."""

    def __init__(self, sentence: str, *, kind: Literal["error", "warning", "info"] = "error") -> None:
        super().__init__(sentence)
        self.notice = Notice(sentence, kind)


Render = Callable[[PageView], Any]
"""A `PageView` → the components' updates (see `app.ui.page.Page.render`)."""


def owned(resolve: OwnerResolver, handler: Callable[..., PageView | None], *, render: Render) -> Callable[..., Any]:
    """An event function: the page's inputs → `handler(owner_id, *inputs)` → the page's updates.

    Expected refusals and storage or model errors become a notice by the composer; only the
    unexpected shows Gradio's error overlay (one generic sentence, the details in the log).
    """

    def event(request: gr.Request, profile: gr.OAuthProfile | None, *values: Any) -> Any:
        try:
            return render(handler(_owner(resolve, request, profile), *values) or PageView())
        except Exception as error:
            return render(PageView(notice=_notice_or_raise(error)))

    return event


def owned_stream(resolve: OwnerResolver, handler: Callable[..., Iterator[PageView]], *,
                 render: Render) -> Callable[..., Iterator[Any]]:
    """Like `owned`, for a generator handler (a streamed reply). Any failure, the unexpected too,
    ends in a notice and an idle page: an overlay would leave Send disabled and Stop lit."""

    def event(request: gr.Request, profile: gr.OAuthProfile | None, *values: Any) -> Iterator[Any]:
        try:
            yielded = False
            for view in handler(_owner(resolve, request, profile), *values):
                yielded = True
                yield render(view)
            if not yielded:  # a generator that yields nothing would set every output to None
                yield render(PageView())
        except Exception as error:  # whatever failed, the composer is usable again afterwards
            try:
                notice = _notice_or_raise(error)
            except gr.Error as raised:
                notice = Notice(str(raised.message))
            yield render(PageView(notice=notice, busy=False))

    return event


def _notice_or_raise(error: Exception) -> Notice:
    if isinstance(error, Refused):
        return error.notice
    if isinstance(error, gr.Error):
        raise error
    raised = user_facing(error)
    if isinstance(error, db.StorageError | MiphaError):
        return Notice(str(raised.message))
    raise raised from error


def _owner(resolve: OwnerResolver, request: gr.Request | None, profile: gr.OAuthProfile | None) -> int | None:
    if request is None:
        return None
    oauth_username = profile.username if profile is not None else None
    return resolve(browser_secret(request.cookies), request.username, oauth_username)
