"""Cancel requests on processing jobs (`cancel_requested_at`): `POST /v1/avatars/{id}/cancel`
ends a queued job at once but only marks a processing one, which its worker stops at the next
denoising step boundary (`JobControlStore.finish_cancelled`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("avatars", sa.Column("cancel_requested_at", sa.Double, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("avatars") as batch:
        batch.drop_column("cancel_requested_at")
