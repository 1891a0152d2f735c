"""Read-only share links: the owner turns one on or off; anyone with the token can read.

A share is a random token (``secrets.token_urlsafe(24)``: 192 bits) that
names one conversation. Viewing it shows the conversation's active path *at
the time of viewing*, so later replies appear and a switched branch shows the
new one. Revoking keeps the row with ``revoked_at`` set, so an old link says
it was turned off rather than that it never existed; a revoked token is never
turned back on (sharing again makes a new one). Deleting the conversation
deletes its shares (ON DELETE CASCADE).

The token is the only key: viewing takes no ``owner_id``. It is checked
against the URL-safe alphabet and a length bound before it reaches the
database, and then only compared for equality with the primary key.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.conversations import owned_conversation
from storage.errors import (
    ImageNotFoundError,
    NotFoundError,
    ShareNotFoundError,
    ShareRevokedError,
)
from storage.mapping import conversation_record, share_record
from storage.models import Conversation, Share, utcnow
from storage.photo_store import image_path
from storage.records import SharedConversation, ShareRecord
from storage.tree import active_path

if TYPE_CHECKING:
    from storage.db import Storage

TOKEN_BYTES = 24
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)


def share_conversation(session: Session, *, owner_id: int, conversation_id: str) -> ShareRecord:
    """The conversation's active share link, made now if it has none."""
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    row = _active_share(session, conversation_id=conversation.id)
    if row is None:
        row = Share(token=secrets.token_urlsafe(TOKEN_BYTES), conversation_id=conversation.id, created_at=utcnow())
        session.add(row)
        session.flush()
    return share_record(row)


def share_of(session: Session, *, owner_id: int, conversation_id: str) -> ShareRecord | None:
    """The conversation's active share link, or ``None`` when it is not shared."""
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    row = _active_share(session, conversation_id=conversation.id)
    return None if row is None else share_record(row)


def revoke_share(session: Session, *, owner_id: int, conversation_id: str) -> bool:
    """Turn the conversation's share link off for good; True if one was on."""
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    rows = session.scalars(
        select(Share).where(Share.conversation_id == conversation.id, Share.revoked_at.is_(None))
    ).all()
    now = utcnow()
    for row in rows:
        row.revoked_at = now
    session.flush()
    return bool(rows)


def shared_conversation(session: Session, *, token: str) -> SharedConversation:
    """What the link shows: the conversation and its active path now.

    Raises ShareNotFoundError for an unknown or malformed token and
    ShareRevokedError for a link its owner turned off.
    """
    share = _viewable_share(session, token=token)
    conversation = session.get_one(Conversation, share.conversation_id)
    return SharedConversation(
        conversation=conversation_record(conversation),
        messages=active_path(session, conversation),
        share=share_record(share),
    )


def shared_image_path(session: Session, *, storage: Storage, token: str, sha256: str) -> Path:
    """The file of a photo shown by the shared link ``token``.

    Only photos of messages on the active path are served, the ones the link
    shows. Anything else (another photo, an unknown or revoked link) raises
    ImageNotFoundError, so the answer never says which of them it was.
    """
    try:
        shown = shared_conversation(session, token=token)
    except NotFoundError as e:
        raise ImageNotFoundError(str(sha256)[:64]) from e
    if not isinstance(sha256, str) or sha256 not in {m.image_sha256 for m in shown.messages}:
        raise ImageNotFoundError(str(sha256)[:64])
    return image_path(storage, sha256, session=session)


def _active_share(session: Session, *, conversation_id: str) -> Share | None:
    return session.scalars(
        select(Share)
        .where(Share.conversation_id == conversation_id, Share.revoked_at.is_(None))
        .order_by(Share.created_at.desc())
        .limit(1)
    ).one_or_none()


def _viewable_share(session: Session, *, token: str) -> Share:
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ShareNotFoundError()
    row = session.get(Share, token)
    if row is None:
        raise ShareNotFoundError()
    if row.revoked_at is not None:
        raise ShareRevokedError()
    return row
