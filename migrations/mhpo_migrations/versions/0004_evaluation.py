"""Durable evaluation: each run stores the last step whose flags and alert rules were evaluated.

The ingest service moves `evaluated_step` in the transaction that stores the flags and
alerts it produced, so a server that dies between storing a batch and evaluating it leaves
the run "behind" (`evaluated_step < last_step`) and the next batch, or the server's start,
evaluates what was missed. Existing runs were evaluated as they were written: they start
caught up. `write_seq` counts the changes to a run's history (batches stored, rewinds), so a
server process knows whether its cached view of the run is still the stored one.

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
        batch.add_column(sa.Column("write_seq", sa.BigInteger(), nullable=False, server_default="0"))
    op.execute("UPDATE runs SET evaluated_step = last_step")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("write_seq")
        batch.drop_column("evaluated_step")
