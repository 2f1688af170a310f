"""recipient portal: session delivery context, sealed subjects

Revision ID: 0002_portal
Revises: 0001
Create Date: 2026-11-23

* ``session.delivery_id``: the delivery whose link started a recipient's
  session, so the link token can leave the URL after the first request.
* ``message.subject_sealed``: the subject alone, sealed to the vault key
  (OpenPGP), so inbox pages need not decrypt whole messages.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_portal"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("session", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delivery_id", sa.String(length=32), nullable=True))
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject_sealed", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("subject_sealed")
    with op.batch_alter_table("session", schema=None) as batch_op:
        batch_op.drop_column("delivery_id")
