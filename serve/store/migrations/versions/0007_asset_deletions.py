"""Files to delete (`asset_deletions`), written in the same transaction as the change that dooms
them: a job with reference photos ended (`photo_retention: job`), an avatar deleted. The
housekeeper deletes what they name, so a crash between commit and delete, a reaped job or a
cancel finished by the worker no longer leaves a user's photos behind (`store.cleanup`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "asset_deletions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, sa.CheckConstraint("reason IN ('photos', 'avatar')"), nullable=False),
        sa.Column("avatar_id", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("ix_asset_deletions_created", "asset_deletions", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_asset_deletions_created", table_name="asset_deletions")
    op.drop_table("asset_deletions")
