"""Worker instances with heartbeats (a dead worker's jobs are reclaimed in seconds, not after a
lease period) and per-avatar order of webhook messages (`subject_id`, `subject_seq`).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_instances",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("process_start", sa.Text),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("heartbeat_at", sa.Double, nullable=False),
    )
    op.create_index("ix_worker_instances_heartbeat", "worker_instances", ["heartbeat_at"])
    op.add_column("webhook_outbox", sa.Column("subject_id", sa.Text, nullable=True))
    op.add_column("webhook_outbox", sa.Column("subject_seq", sa.Integer, nullable=True))
    op.create_index("ix_outbox_subject", "webhook_outbox", ["subject_id", "endpoint_id", "subject_seq"])


def downgrade() -> None:
    op.drop_index("ix_outbox_subject", table_name="webhook_outbox")
    with op.batch_alter_table("webhook_outbox") as batch:
        batch.drop_column("subject_seq")
        batch.drop_column("subject_id")
    op.drop_index("ix_worker_instances_heartbeat", table_name="worker_instances")
    op.drop_table("worker_instances")
