"""Messages record how many prompt tokens came from the conversation's KV cache.

Revision ID: 0002
Revises: 0001

Nullable: replies written before this revision (or by an engine without cache
reuse) have no figure, which is not the same as zero reused tokens.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reused_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("reused_tokens")
