"""Progress of processing jobs (`progress`, written throttled by the worker) and the image-link
epoch (`link_epoch`, part of every signed image URL; bumped when an avatar stops being public so
links handed out while it was published stop working).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("avatars", sa.Column("progress", sa.Text, nullable=True))
    op.add_column("avatars", sa.Column("link_epoch", sa.Integer, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("avatars") as batch:
        batch.drop_column("link_epoch")
        batch.drop_column("progress")
