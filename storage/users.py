"""Who is asking: anonymous browser identities, password users and OAuth users.

Storage does not authenticate anyone. Gradio checks passwords and Hugging Face
checks OAuth; the app then maps the identity it trusts to a user row here.
"""

from __future__ import annotations

import hashlib
import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.errors import InvalidInputError, NotFoundError
from storage.mapping import user_record
from storage.models import User
from storage.records import UserKind, UserRecord

logger = logging.getLogger(__name__)

MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 256
MAX_USERNAME_CHARS = 96


def hash_browser_secret(secret: str) -> str:
    """SHA-256 hex of a browser secret.

    A plain (unsalted, fast) hash is enough because the secret is random and
    long, not a password: nothing to brute-force. Storing only the hash means
    a leaked database cannot be used to impersonate a browser.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def user_for_browser_secret(session: Session, *, secret: str) -> UserRecord:
    """The anonymous user whose browser keeps ``secret``; created on first visit."""
    if not isinstance(secret, str) or not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS:
        raise InvalidInputError(
            f"The browser identity must be a random string of {MIN_SECRET_CHARS} to "
            f"{MAX_SECRET_CHARS} characters; clear this site's data and reload the page."
        )
    return _get_or_create(session, kind=UserKind.ANONYMOUS, identity=hash_browser_secret(secret))


def user_for_password_login(session: Session, *, username: str) -> UserRecord:
    """The user for a username that Gradio's ``--auth`` already authenticated."""
    return _get_or_create(session, kind=UserKind.PASSWORD, identity=_clean_username(username))


def user_for_oauth(session: Session, *, username: str) -> UserRecord:
    """The user for a Hugging Face username from OAuth login."""
    return _get_or_create(session, kind=UserKind.OAUTH, identity=_clean_username(username))


def get_user(session: Session, *, user_id: int) -> UserRecord:
    row = session.get(User, user_id)
    if row is None:
        raise NotFoundError(f"User {user_id} was not found; sign in again.")
    return user_record(row)


def _clean_username(username: str) -> str:
    name = username.strip() if isinstance(username, str) else ""
    if not name or len(name) > MAX_USERNAME_CHARS:
        raise InvalidInputError(
            f"A username must have 1 to {MAX_USERNAME_CHARS} characters, got {username!r:.120}."
        )
    return name


def _get_or_create(session: Session, *, kind: UserKind, identity: str) -> UserRecord:
    query = select(User).where(User.kind == kind.value, User.identity == identity)
    row = session.scalars(query).one_or_none()
    if row is not None:
        return user_record(row)
    try:
        # A savepoint, so losing a race with another first request for the
        # same identity does not roll back the caller's whole transaction.
        with session.begin_nested():
            row = User(kind=kind.value, identity=identity)
            session.add(row)
    except IntegrityError:
        row = session.scalars(query).one()
    else:
        logger.info("created %s user %d", kind.value, row.id)
    return user_record(row)
