"""retention: partial indexes for the expiry and purge sweeps

Revision ID: 0004_retention
Revises: 0003_staff_security
Create Date: 2026-11-23

The hourly retention run looks for messages not yet expired (by
``expires_at``) and not yet purged (by ``created_at``). Over the years
almost every message is both expired and purged; these partial indexes hold
only the rest, so a run costs the same at a thousand messages as at a
million. PostgreSQL and SQLite both support partial indexes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_retention"
down_revision = "0003_staff_security"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_message_unexpired",
        "message",
        ["expires_at"],
        unique=False,
        sqlite_where=sa.text("expired_at IS NULL"),
        postgresql_where=sa.text("expired_at IS NULL"),
    )
    op.create_index(
        "ix_message_unpurged",
        "message",
        ["created_at"],
        unique=False,
        sqlite_where=sa.text("purged_at IS NULL"),
        postgresql_where=sa.text("purged_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_message_unpurged", table_name="message")
    op.drop_index("ix_message_unexpired", table_name="message")
