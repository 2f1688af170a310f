"""staff security: second factor state, SMTP app passwords, recovery codes

Revision ID: 0003_staff_security
Revises: 0002_portal
Create Date: 2026-11-23

* ``staff.totp_enrolled_at``, ``staff.totp_last_step``: when the second factor
  was enrolled, and the last time step accepted (a code is never used twice).
* ``app_password``: named, revocable SMTP passwords per mail client (Argon2id).
* ``recovery_code``: one-time second-factor codes (Argon2id).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_staff_security"
down_revision = "0002_portal"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("staff", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("totp_enrolled_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("totp_last_step", sa.BigInteger(), nullable=True))
    op.create_table(
        "app_password",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("staff_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("secret_hash", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["staff_id"], ["staff.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_app_password_staff_id", "app_password", ["staff_id"])
    op.create_table(
        "recovery_code",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("staff_id", sa.String(length=32), nullable=False),
        sa.Column("code_hash", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["staff_id"], ["staff.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_recovery_code_staff_id", "recovery_code", ["staff_id"])


def downgrade() -> None:
    op.drop_index("ix_recovery_code_staff_id", table_name="recovery_code")
    op.drop_table("recovery_code")
    op.drop_index("ix_app_password_staff_id", table_name="app_password")
    op.drop_table("app_password")
    with op.batch_alter_table("staff", schema=None) as batch_op:
        batch_op.drop_column("totp_last_step")
        batch_op.drop_column("totp_enrolled_at")
