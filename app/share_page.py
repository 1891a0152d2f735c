"""Read-only pages of conversations shared by link: `/share/{token}` and the photos in it.

The page is plain HTML with one stylesheet and no JavaScript. Everything people or the model
wrote goes through `render_markdown` (raw HTML off, images never loaded), the title through
`html.escape`; the only images are the conversation's own photos, which the photo route
serves only while the link is on. Every answer says `no-store`, so turning a link off holds
from the next request, and `noindex`. The HTTP guard in front adds the security headers and,
with `--auth`, asks for the login as on every other route.
"""

from __future__ import annotations

import html
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

import storage as db
from app.render import render_markdown
from storage import Storage

log = logging.getLogger(__name__)

STYLESHEET = Path(__file__).resolve().parent.parent / "assets" / "share.css"
STYLESHEET_PATH = "/share/assets/share.css"
NO_STORE = {"cache-control": "no-store", "x-robots-tag": "noindex"}
PHOTO_NOT_AVAILABLE = "This photo is not available."
REPLY_NOTES = {
    db.MessageStatus.PARTIAL: "(still being written)",
    db.MessageStatus.INTERRUPTED: "(interrupted before the end)",
    db.MessageStatus.CANCELLED: "(stopped before the end)",
    db.MessageStatus.ERROR: "(the reply failed)",
}
_HEADING_TAG = re.compile(r"<(/?)h([1-6])>")

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="robots" content="noindex">
<title>{title}</title>
<link rel="stylesheet" href="assets/share.css">
</head>
<body>
<main>
{content}
</main>
</body>
</html>
"""
"""Served at `/share/<token>` only, so the relative stylesheet and photo URLs resolve under `/share/`
(behind a proxy that adds a path prefix too)."""


def share_routes(storage: Storage) -> list[BaseRoute]:
    """`/share/{token}`, its photos and its stylesheet, over `storage`; GET and HEAD only."""
    css = STYLESHEET.read_bytes()

    async def page(request: Request) -> Response:
        return await run_in_threadpool(page_response, storage, token=request.path_params["token"])

    async def photo(request: Request) -> Response:
        params = request.path_params
        return await run_in_threadpool(photo_response, storage, token=params["token"], sha256=params["sha256"])

    async def stylesheet(_: Request) -> Response:
        return Response(css, media_type="text/css", headers={"cache-control": "no-cache"})

    return [
        Route(STYLESHEET_PATH, stylesheet, methods=["GET"]),
        Route("/share/{token}", page, methods=["GET"]),
        Route("/share/{token}/photo/{sha256}", photo, methods=["GET"]),
    ]


def page_response(storage: Storage, *, token: str) -> Response:
    """The shared conversation's page; 404 for an unknown link, 410 for one turned off."""
    try:
        with storage.session() as session:
            shared = db.shared_conversation(session, token=token)
    except db.ShareRevokedError as e:
        return _page(410, notice_page("This link was turned off", str(e)))
    except db.ShareNotFoundError as e:
        return _page(404, notice_page("Shared conversation not found", str(e)))
    except db.StorageUnavailableError as e:  # the cause is logged by storage
        return _page(503, notice_page("Not available just now", str(e)))
    return _page(200, conversation_page(shared))


def photo_response(storage: Storage, *, token: str, sha256: str) -> Response:
    """A photo of the shared conversation, typed by its stored format; 404 for any other photo.

    `shared_image_path` answers "not found" for a link turned off too; the link is looked up
    first so that its photos say 410, like its page (which tells the same already).
    """
    try:
        with storage.session() as session:
            db.shared_conversation(session, token=token)
            path = db.shared_image_path(session, storage=storage, token=token, sha256=sha256)
            media_type = db.get_image(session, sha256=sha256).mime_type
        data = path.read_bytes()
    except db.ShareRevokedError as e:
        return PlainTextResponse(f"{e}\n", status_code=410, headers=NO_STORE)
    except (db.ShareNotFoundError, db.ImageNotFoundError, FileNotFoundError):  # deleted since: not found
        return PlainTextResponse(f"{PHOTO_NOT_AVAILABLE}\n", status_code=404, headers=NO_STORE)
    except db.StorageUnavailableError as e:
        return PlainTextResponse(f"{e}\n", status_code=503, headers=NO_STORE)
    except OSError as e:
        log.warning("could not read a shared photo %s: %s", sha256, e)
        return PlainTextResponse(f"{db.StorageUnavailableError()}\n", status_code=503, headers=NO_STORE)
    return Response(data, media_type=media_type, headers=NO_STORE)


def conversation_page(shared: db.SharedConversation) -> str:
    """The whole page: title, when it was shared, then each question and reply in order."""
    title = html.escape(shared.conversation.title)
    photos = f"{quote(shared.share.token, safe='')}/photo/"
    messages = "".join(message_html(m, photos=photos) for m in shared.messages)
    when = _utc(shared.share.created_at)
    content = (
        f"<h1>{title}</h1>\n"
        f'<p class="shared-note">Shared read-only from Mipha Chat · '
        f'<time datetime="{when:%Y-%m-%d}">{when.day} {when:%B %Y}</time></p>\n'
        f"{messages or '<p>No messages yet.</p>'}"
    )
    return _PAGE.format(title=f"{title} · Mipha Chat", content=content)


def message_html(message: db.MessageRecord, *, photos: str) -> str:
    """One question (its photo, then its text) or one reply, with a note if the reply is unfinished.

    `photos` is the relative URL the photo names are appended to.
    """
    question = message.role == db.Role.USER
    parts = [f'<article class="message {"question" if question else "reply"}">',
             f'<h2 class="who">{"Question" if question else "Reply"}</h2>']
    if message.image_sha256:
        src = html.escape(photos + quote(message.image_sha256, safe=""))
        parts.append(f'<img class="photo" src="{src}" alt="photo" loading="lazy">')
    if message.text:
        parts.append(f'<div class="text">{_below_h2(render_markdown(message.text))}</div>')
    note = None if question else REPLY_NOTES.get(message.status)
    if note:
        parts.append(f'<p class="note">{note}</p>')
    parts.append("</article>\n")
    return "".join(parts)


def notice_page(heading: str, sentence: str) -> str:
    """A page that only says why there is nothing to show (`sentence` is escaped here)."""
    content = f"<h1>{html.escape(heading)}</h1>\n<p>{html.escape(sentence)}</p>"
    return _PAGE.format(title=f"{html.escape(heading)} · Mipha Chat", content=content)


def _below_h2(rendered: str) -> str:
    """A message's headings move down so its highest is an h3: the page keeps one h1, and no level is skipped.

    Only the renderer writes `<hN>` tags (raw HTML in a message comes out escaped), and
    without attributes.
    """
    levels = [int(m[2]) for m in _HEADING_TAG.finditer(rendered)]
    if not levels:
        return rendered
    shift = 3 - min(levels)
    return _HEADING_TAG.sub(lambda m: f"<{m[1]}h{min(int(m[2]) + shift, 6)}>", rendered)


def _page(status: int, page: str) -> Response:
    return HTMLResponse(page, status_code=status, headers=NO_STORE)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

