"""The shape of a conversation tree and its active path.

A conversation is a tree of messages, as in HF chat-ui: each message has a
parent (``None`` for a root question) and ``position`` is its depth. Editing a
question adds a sibling question; regenerating adds a sibling reply; nothing
is overwritten. ``Conversation.active_leaf_id`` names the last message of the
branch on screen, and the *active path* runs from its root down to it.

A conversation holds at most ``max_messages_per_conversation`` messages, so
its shape (ids, parents, depths, roles; no text) is read whole in one query
and walked here in Python: the path, the siblings of every message on it and
the newest branch below a message then cost that one query however deep the
conversation is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.errors import MessageNotFoundError
from storage.mapping import message_record
from storage.models import Conversation, Message
from storage.records import MessageRecord, Role


@dataclass(frozen=True)
class Node:
    id: int
    parent_id: int | None
    position: int
    role: Role


class Tree:
    """Every message of one conversation, without text."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self.nodes = {node.id: node for node in nodes}
        children: dict[int | None, list[int]] = defaultdict(list)
        for message_id in sorted(self.nodes):
            children[self.nodes[message_id].parent_id].append(message_id)
        self._children = dict(children)

    @classmethod
    def load(cls, session: Session, *, conversation_id: str) -> Tree:
        rows = session.execute(
            select(Message.id, Message.parent_id, Message.position, Message.role).where(
                Message.conversation_id == conversation_id
            )
        )
        return cls(Node(id=i, parent_id=p, position=pos, role=Role(r)) for i, p, pos, r in rows)

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, message_id: object) -> Node:
        """The message, or MessageNotFoundError when it is not in this conversation."""
        if type(message_id) is not int:  # not bool, str or float: those would match an id
            raise MessageNotFoundError(str(message_id)[:20])  # type: ignore[arg-type]
        if message_id not in self.nodes:
            raise MessageNotFoundError(message_id)
        return self.nodes[message_id]

    def children(self, message_id: int | None) -> tuple[int, ...]:
        """Ids of the messages that follow ``message_id`` (roots for ``None``), oldest first."""
        return tuple(self._children.get(message_id, ()))

    def siblings(self, message_id: int) -> tuple[int, ...]:
        return self.children(self.nodes[message_id].parent_id)

    def leaf(self, active_leaf_id: int | None) -> int | None:
        """The stored active leaf; if it is missing, the newest message (which is always a leaf)."""
        if active_leaf_id in self.nodes:
            return active_leaf_id
        return max(self.nodes, default=None)

    def path(self, leaf_id: int | None) -> list[int]:
        """Ids from the root down to ``leaf_id``; stops rather than loop on a corrupt cycle."""
        path: list[int] = []
        current = leaf_id
        while current in self.nodes and len(path) < len(self.nodes):
            path.append(current)
            current = self.nodes[current].parent_id
        return path[::-1]

    def newest_leaf_under(self, message_id: int) -> int:
        """Follow the newest child (highest id) from ``message_id`` down to a leaf."""
        current = message_id
        while children := self._children.get(current):
            current = children[-1]
        return current

    def subtree(self, message_id: int) -> list[int]:
        """``message_id`` and every message below it."""
        found, pending = [], [message_id]
        while pending:
            current = pending.pop()
            found.append(current)
            pending.extend(self._children.get(current, ()))
        return found


def active_path(session: Session, conversation: Conversation) -> list[MessageRecord]:
    """The messages from the root to the active leaf, with their parents and siblings.

    Two queries: the tree's shape, then the rows on the path.
    """
    tree = Tree.load(session, conversation_id=conversation.id)
    ids = tree.path(tree.leaf(conversation.active_leaf_id))
    if not ids:
        return []
    rows = session.scalars(
        select(Message).where(Message.conversation_id == conversation.id, Message.id.in_(ids))
    )
    by_id = {row.id: row for row in rows}
    return [message_record(by_id[i], sibling_ids=tree.siblings(i)) for i in ids]


def sibling_ids(session: Session, row: Message) -> tuple[int, ...]:
    """Ids of the messages with ``row``'s parent in its conversation, oldest first (one query)."""
    same_parent = Message.parent_id.is_(None) if row.parent_id is None else Message.parent_id == row.parent_id
    return tuple(
        session.scalars(
            select(Message.id)
            .where(Message.conversation_id == row.conversation_id, same_parent)
            .order_by(Message.id)
        )
    )
