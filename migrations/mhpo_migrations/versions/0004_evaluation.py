"""Durable evaluation: each run stores the last step whose flags and alert rules were evaluated.

The ingest service moves `evaluated_step` in the transaction that stores the flags and
alerts it produced, so a server that dies between storing a batch and evaluating it leaves
the run "behind" (`evaluated_step < last_step`) and the next batch, or the server's start,
evaluates what was missed. Existing runs were evaluated as they were written: they start
caught up.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("evaluated_step", sa.BigInteger(), nullable=True))
    op.execute("UPDATE runs SET evaluated_step = last_step")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("evaluated_step")
