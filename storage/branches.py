"""Moving along a conversation tree: regenerate a reply, show another branch.

Neither function deletes anything: both move the conversation's active leaf
(see :mod:`storage.tree`) and return the new active path, what
:func:`storage.list_messages` returns from then on.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from storage.conversations import owned_conversation
from storage.errors import InvalidInputError
from storage.records import MessageRecord, Role
from storage.tree import Tree, active_path


def regenerate_from(
    session: Session, *, owner_id: int, conversation_id: str, question_id: int
) -> list[MessageRecord]:
    """Make the question ``question_id`` the active leaf, ready for a new reply.

    The next :func:`storage.start_assistant_message` (or ``ReplyWriter.start``)
    then adds a reply beside the earlier ones, which stay reachable with
    :func:`switch_branch`. Returns the active path, which now ends with the question.
    """
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id, for_update=True)
    question = Tree.load(session, conversation_id=conversation.id).node(question_id)
    if question.role is not Role.USER:
        raise InvalidInputError(
            f"Message {question_id} is a reply; regenerate from the question it answers "
            f"(message {question.parent_id})."
        )
    conversation.active_leaf_id = question.id
    session.flush()
    return active_path(session, conversation)


def switch_branch(
    session: Session, *, owner_id: int, conversation_id: str, message_id: int
) -> list[MessageRecord]:
    """Show the branch through ``message_id``: it and its newest descendants become the active path.

    From ``message_id`` down, each step follows the newest child (highest id),
    so switching to an edited question shows the latest exchange after it.
    A message of another conversation (or owner) raises MessageNotFoundError.
    """
    conversation = owned_conversation(session, owner_id=owner_id, conversation_id=conversation_id, for_update=True)
    tree = Tree.load(session, conversation_id=conversation.id)
    conversation.active_leaf_id = tree.newest_leaf_under(tree.node(message_id).id)
    session.flush()
    return active_path(session, conversation)
