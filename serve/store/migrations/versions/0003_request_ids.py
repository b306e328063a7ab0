"""Request ids on jobs and outbox messages, for log correlation across ingress, worker and
webhook dispatcher (see `serve.logctx`). Nullable: rows made before this revision have none.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("avatars", sa.Column("request_id", sa.Text, nullable=True))
    op.add_column("webhook_outbox", sa.Column("request_id", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_outbox") as batch:
        batch.drop_column("request_id")
    with op.batch_alter_table("avatars") as batch:
        batch.drop_column("request_id")
