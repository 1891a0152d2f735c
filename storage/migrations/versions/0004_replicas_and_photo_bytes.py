"""Replicas sharing one database: who streams each reply, heartbeats, photo bytes in the database.

Revision ID: 0004
Revises: 0003

``replicas`` holds one row per server process using a shared (PostgreSQL)
database, with a heartbeat; replies record the replica streaming them
(``messages.replica_id``), so a replica starting up marks ``interrupted`` only
the replies of replicas that are gone. ``image_blobs`` keeps photo bytes in the
database, so that every replica can serve every photo; on SQLite it stays empty
(photos are files under the one server's data directory). Existing replies have
no replica: at the next start they count as written by a stopped server, as before.

Downgrading drops both tables and the column. Photo bytes kept only in the
database go with ``image_blobs``: before downgrading a PostgreSQL database,
copy them into a server's images directory with ``storage.images.cache_all_photos``
(the older revision reads photos from files only).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sha256"], ["images.sha256"], name=op.f("fk_image_blobs_sha256_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_image_blobs")),
    )
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("home", sa.String(length=600), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replica_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    _require_sqlite_foreign_keys_off()
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("replica_id")
    op.drop_table("replicas")
    op.drop_table("image_blobs")


def _require_sqlite_foreign_keys_off() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            "Downgrading revision 0004 copies the messages table, and with SQLite's foreign keys on "
            "that copy would delete messages. Run it through storage.migrate, which turns them off."
        )
