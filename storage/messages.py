"""Messages of a conversation tree: questions, replies being streamed, the active path.

Every function is scoped by owner: a message is found through its
conversation, with the owner in the same query. New messages go below the
conversation's active leaf (see :mod:`storage.tree`); :mod:`storage.branches`
moves that leaf to regenerate a reply or to show another branch.

Every change to a conversation's tree first locks the conversation's row
(:func:`storage.conversations.owned_conversation` with ``for_update``), so
writers in different processes sharing one PostgreSQL database take turns:
each reads the tree as the previous one left it, so two questions sent at once
follow one another instead of both answering the same message.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from storage.conversations import DEFAULT_TITLE, owned_conversation, title_from_text
from storage.errors import ImageNotFoundError, InvalidInputError, LimitExceededError, MessageNotFoundError
from storage.mapping import limits_of, message_record
from storage.models import Conversation, Image, Message, utcnow
from storage.photo_store import release_unused_images
from storage.records import MessageRecord, MessageStatus, Role
from storage.tree import Node, Tree, active_path, sibling_ids

logger = logging.getLogger(__name__)

PHOTO_TITLE = "Photo"
MAX_FINISH_REASON_CHARS = 32


def add_user_message(
    session: Session,
    *,
    owner_id: int,
    conversation_id: str,
    text: str,
    image_sha256: str | None = None,
    edit_of: int | None = None,
) -> MessageRecord:
    """Add a question and make it the active leaf.

    Without ``edit_of`` it follows the active leaf: normally a reply, but a
    question left without one (a reply stopped before it started) is followed
    just the same. With ``edit_of``, the id of a question in this conversation,
    it becomes that question's sibling (same parent, same position): the old
    question and its branch stay, and :func:`storage.switch_branch` shows them
    again. The first root question of an untitled conversation becomes its title.
    """
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id, for_update=True)
    _check_question(session, text=text, image_sha256=image_sha256)
    tree = Tree.load(session, conversation_id=conversation.id)
    parent = _parent_of_new_question(tree, conversation, edit_of=edit_of)
    row = _add(session, conversation, tree, parent=parent, role=Role.USER, text=text, image_sha256=image_sha256)
    if row.parent_id is None and conversation.title == DEFAULT_TITLE:
        limit = limits_of(session).max_title_chars
        conversation.title = title_from_text(text, max_chars=limit) if text.strip() else PHOTO_TITLE
    session.flush()
    return _record(session, row)


def title_photo_conversation(session: Session, *, owner_id: int, conversation_id: str, reply_text: str) -> bool:
    """A conversation started with a photo alone is titled "Photo" at first; its first reply names it.

    Returns True when the title changed. A title the person chose, or one from a question, stays.
    """
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    if conversation.title != PHOTO_TITLE or not reply_text.strip():
        return False
    first_sentence = reply_text.strip().split("\n", 1)[0].split(". ", 1)[0]
    conversation.title = title_from_text(first_sentence, max_chars=limits_of(session).max_title_chars)
    session.flush()
    return True


def start_assistant_message(
    session: Session, *, owner_id: int, conversation_id: str, replica_id: str | None = None
) -> MessageRecord:
    """Add an empty reply (status ``partial``) to the active leaf, which must be a question.

    The reply becomes the active leaf; grow it with update_assistant_message.
    ``replica_id`` names the Storage streaming it (``storage.replica_id``), so
    that another replica's start-up leaves it alone while that one lives.
    """
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id, for_update=True)
    tree = Tree.load(session, conversation_id=conversation.id)
    leaf = tree.leaf(conversation.active_leaf_id)
    if leaf is None or tree.nodes[leaf].role is not Role.USER:
        raise InvalidInputError(
            "There is no question waiting for a reply: the conversation is empty or already ends "
            "with a reply. Ask a question, or regenerate the reply to an earlier one."
        )
    row = _add(
        session, conversation, tree, parent=tree.nodes[leaf], role=Role.ASSISTANT, text="", replica_id=replica_id
    )
    return _record(session, row)


def update_assistant_message(
    session: Session,
    *,
    owner_id: int,
    message_id: int,
    text: str,
    status: MessageStatus = MessageStatus.PARTIAL,
    finish_reason: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    reused_tokens: int | None = None,
    first_token_seconds: float | None = None,
    duration_seconds: float | None = None,
) -> MessageRecord:
    """Replace a reply's text and status (and, when given, its counts and timings)."""
    check_message_text(session, text)
    if finish_reason is not None and len(finish_reason) > MAX_FINISH_REASON_CHARS:
        raise InvalidInputError(f"finish_reason is too long: {finish_reason[:40]!r}…")
    row = _owned_message(session, owner_id=owner_id, message_id=message_id, lock_conversation=True)
    if row.role != Role.ASSISTANT:
        raise InvalidInputError(f"Message {message_id} is a question, not a reply; it cannot be updated.")
    now = utcnow()
    row.text, row.status, row.updated_at = text, MessageStatus(status).value, now
    optional = {
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "reused_tokens": reused_tokens,
        "first_token_seconds": first_token_seconds,
        "duration_seconds": duration_seconds,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(row, name, value)
    row.conversation.updated_at = now
    session.flush()
    return _record(session, row)


def list_messages(session: Session, *, owner_id: int, conversation_id: str) -> list[MessageRecord]:
    """The active path: from the root question down to the active leaf, in order.

    Each record carries its ``parent_id`` and ``sibling_ids``, so the UI can
    offer the other branches at every step.
    """
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id)
    return active_path(session, conversation)


def delete_messages_from(
    session: Session, *, owner_id: int, conversation_id: str, position: int
) -> int:
    """Delete the active path's message at depth ``position`` and every message below it.

    For callers written before branches (editing and regenerating now keep the
    old messages). Only that message's branch goes: its siblings and their
    branches stay. The active leaf moves to its parent (after a root question,
    to the newest message left). Returns how many messages were deleted;
    photos no other message uses are released.
    """
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id, for_update=True)
    if type(position) is not int or position < 0:
        raise InvalidInputError(f"A message position is a depth of 0 or more, got {position!r:.40}.")
    tree = Tree.load(session, conversation_id=conversation.id)
    path = tree.path(tree.leaf(conversation.active_leaf_id))
    if position >= len(path):
        return 0
    doomed = tree.subtree(path[position])
    images = set(
        session.scalars(
            select(Message.image_sha256).where(Message.id.in_(doomed), Message.image_sha256.is_not(None))
        )
    )
    session.execute(delete(Message).where(Message.id.in_(doomed)))
    parent = tree.nodes[path[position]].parent_id
    conversation.active_leaf_id = parent if parent is not None else max(set(tree.nodes) - set(doomed), default=None)
    conversation.updated_at = utcnow()
    session.flush()
    release_unused_images(session, candidates=images)
    return len(doomed)


def mark_interrupted_replies(session: Session) -> int:
    """Mark every reply left ``partial`` as ``interrupted``.

    For SQLite's start-up only: one server per database, so at that moment no
    reply can still be streaming. (A shared database sweeps per replica, see
    :mod:`storage.replicas`.) Returns how many replies were marked.
    """
    result = session.execute(
        update(Message)
        .where(Message.status == MessageStatus.PARTIAL.value)
        .values(status=MessageStatus.INTERRUPTED.value, finish_reason="interrupted")
    )
    if result.rowcount:
        logger.warning("marked %d unfinished replies as interrupted", result.rowcount)
    return result.rowcount


def check_message_text(session: Session, text: str) -> None:
    if not isinstance(text, str):
        raise InvalidInputError(f"Message text must be a string, got {type(text).__name__}.")
    limit = limits_of(session).max_message_chars
    if len(text) > limit:
        raise LimitExceededError(
            f"The message has {len(text)} characters; the limit is {limit}. Shorten it or split it.",
            limit_name="max_message_chars",
            limit=limit,
            actual=len(text),
        )


def _check_question(session: Session, *, text: str, image_sha256: str | None) -> None:
    check_message_text(session, text)
    if not text.strip() and image_sha256 is None:
        raise InvalidInputError("A message needs some text or a photo.")
    if image_sha256 is None:
        return
    if not isinstance(image_sha256, str):
        raise ImageNotFoundError(str(image_sha256)[:64])
    # FOR SHARE: the photo's row stays until this message is stored (see release_unused_images).
    found = session.scalar(select(Image.sha256).where(Image.sha256 == image_sha256).with_for_update(read=True))
    if found is None:
        raise ImageNotFoundError(image_sha256)


def _parent_of_new_question(tree: Tree, conversation: Conversation, *, edit_of: int | None) -> Node | None:
    if edit_of is None:
        leaf = tree.leaf(conversation.active_leaf_id)
        return None if leaf is None else tree.nodes[leaf]
    edited = tree.node(edit_of)
    if edited.role is not Role.USER:
        raise InvalidInputError(
            f"Message {edit_of} is a reply, and only questions can be edited. "
            "Regenerate the reply instead, or edit the question it answers."
        )
    return None if edited.parent_id is None else tree.nodes[edited.parent_id]


def _add(
    session: Session,
    conversation: Conversation,
    tree: Tree,
    *,
    parent: Node | None,
    role: Role,
    text: str,
    image_sha256: str | None = None,
    replica_id: str | None = None,
) -> Message:
    """Insert a message below ``parent`` and make it the active leaf."""
    limit = limits_of(session).max_messages_per_conversation
    if len(tree) >= limit:
        raise LimitExceededError(
            f"This conversation has reached {limit} messages, the most it can hold. "
            "Start a new conversation to go on.",
            limit_name="max_messages_per_conversation",
            limit=limit,
            actual=len(tree) + 1,
        )
    now = utcnow()
    row = Message(
        conversation_id=conversation.id,
        parent_id=None if parent is None else parent.id,
        position=0 if parent is None else parent.position + 1,
        role=role.value,
        text=text,
        image_sha256=image_sha256,
        status=(MessageStatus.COMPLETE if role is Role.USER else MessageStatus.PARTIAL).value,
        replica_id=replica_id,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    conversation.active_leaf_id, conversation.updated_at = row.id, now
    return row


def _record(session: Session, row: Message) -> MessageRecord:
    return message_record(row, sibling_ids=sibling_ids(session, row))


def _owned_message(session: Session, *, owner_id: int, message_id: int, lock_conversation: bool = False) -> Message:
    """The message, found through its conversation and owner; MessageNotFoundError otherwise.

    ``lock_conversation`` locks the conversation first, then reads the message
    as the last writer left it (the conversation before its messages: the
    order every writer locks in).
    """
    if lock_conversation:
        session.execute(
            select(Conversation.id)
            .join(Message, Message.conversation_id == Conversation.id)
            .where(Message.id == message_id, Conversation.owner_id == owner_id)
            .with_for_update(of=Conversation)
        )
    row = session.scalars(
        select(Message)
        .join(Conversation, Message.conversation_id == Conversation.id)
        .where(Message.id == message_id, Conversation.owner_id == owner_id)
        .execution_options(populate_existing=lock_conversation)
    ).one_or_none()
    if row is None:
        raise MessageNotFoundError(message_id)
    return row
