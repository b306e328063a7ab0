"""Retire the `schema_version` table of the store's former hand-written migration runner.

A database made by that runner holds `schema_version` (version 1) and no `alembic_version`;
`Database.migrate` stamps it with revision 0001 (same tables) and this revision drops the old
bookkeeping table. On a database created by Alembic the table does not exist: nothing to do.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "schema_version" in sa.inspect(op.get_bind()).get_table_names():
        op.drop_table("schema_version")


def downgrade() -> None:
    pass  # nothing to restore: the old runner's table only recorded "version 1"
