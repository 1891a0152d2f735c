"""Conversations become trees of messages; read-only share links.

Revision ID: 0003
Revises: 0002

Messages get ``parent_id`` (NULL for a root question) and ``position`` now
means depth, so siblings (an edited question, a regenerated reply) share it:
the unique (conversation_id, position) constraint becomes a plain index.
Conversations get ``active_leaf_id``, the last message of the branch on
screen. Existing conversations are single chains: each message's parent is
the one before it by position, and the active leaf is the last one.

Batch mode copies the messages table (SQLite cannot drop a constraint in
place). Run it through ``storage.migrate``, which turns SQLite's foreign keys
off while tables are copied; with them on, the copy would cascade-delete rows.

Downgrading keeps only each conversation's active path (other branches are
deleted: the old schema cannot hold them) and deletes every share link.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The message before this one by position (always position - 1: positions
# were contiguous from 0), so a gap could only join the chain, never split it.
_BACKFILL_PARENTS = """
UPDATE messages SET parent_id = (
    SELECT earlier.id FROM messages AS earlier
    WHERE earlier.conversation_id = messages.conversation_id AND earlier.position < messages.position
    ORDER BY earlier.position DESC LIMIT 1
)
"""
_BACKFILL_LEAVES = """
UPDATE conversations SET active_leaf_id = (
    SELECT m.id FROM messages AS m WHERE m.conversation_id = conversations.id
    ORDER BY m.position DESC LIMIT 1
)
"""
# Every message on an active path: from each leaf (or the newest message, as
# storage reads a missing leaf) up through the parents.
_DELETE_OFF_PATH = """
DELETE FROM messages WHERE id NOT IN (
    WITH RECURSIVE path(id, parent_id) AS (
        SELECT m.id, m.parent_id FROM messages AS m JOIN conversations AS c ON m.id = COALESCE(
            c.active_leaf_id, (SELECT max(n.id) FROM messages AS n WHERE n.conversation_id = c.id))
        UNION ALL
        SELECT m.id, m.parent_id FROM messages AS m JOIN path ON m.id = path.parent_id
    )
    SELECT id FROM path
)
"""


def upgrade() -> None:
    _require_sqlite_foreign_keys_off()
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch_op.drop_constraint("uq_messages_conversation_id_position", type_="unique")
        batch_op.create_foreign_key(
            op.f("fk_messages_parent_id_messages"), "messages", ["parent_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.create_index("ix_messages_conversation_id_position", ["conversation_id", "position"], unique=False)
        batch_op.create_index("ix_messages_parent_id", ["parent_id"], unique=False)
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("active_leaf_id", sa.Integer(), nullable=True))
    op.execute(_BACKFILL_PARENTS)
    op.execute(_BACKFILL_LEAVES)
    op.create_table(
        "shares",
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("conversation_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"],
            name=op.f("fk_shares_conversation_id_conversations"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_shares")),
    )
    with op.batch_alter_table("shares", schema=None) as batch_op:
        batch_op.create_index("ix_shares_conversation_id", ["conversation_id"], unique=False)


def downgrade() -> None:
    _require_sqlite_foreign_keys_off()
    with op.batch_alter_table("shares", schema=None) as batch_op:
        batch_op.drop_index("ix_shares_conversation_id")
    op.drop_table("shares")
    op.execute(_DELETE_OFF_PATH)
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("active_leaf_id")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_parent_id")
        batch_op.drop_index("ix_messages_conversation_id_position")
        batch_op.drop_constraint("fk_messages_parent_id_messages", type_="foreignkey")
        batch_op.drop_column("parent_id")
        batch_op.create_unique_constraint(
            op.f("uq_messages_conversation_id_position"), ["conversation_id", "position"]
        )


def _require_sqlite_foreign_keys_off() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            "Revision 0003 copies the messages and conversations tables, and with SQLite's foreign "
            "keys on that copy would delete messages. Run it through storage.migrate (open_storage "
            "does), which turns them off for the migration."
        )
