"""Rewind and fork: a run's parent and fork step; fired alerts marked rewound.

The unique constraint on alerts (rule, run, step) becomes a unique index over the alerts
not rewound, so a step of a rewound trajectory can fire again on the new one.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NOT_REWOUND = sa.text("rewound_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("parent_run_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("fork_step", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("rewound_at", sa.Double(), nullable=True))
        batch.drop_constraint("uq_alerts_rule_id_run_id_step", type_="unique")
    op.create_index(
        "uq_alerts_rule_id_run_id_step",
        "alerts",
        ["rule_id", "run_id", "step"],
        unique=True,
        sqlite_where=NOT_REWOUND,
        postgresql_where=NOT_REWOUND,
    )


def downgrade() -> None:
    op.execute("DELETE FROM alerts WHERE rewound_at IS NOT NULL")
    op.drop_index("uq_alerts_rule_id_run_id_step", table_name="alerts")
    with op.batch_alter_table("alerts") as batch:
        batch.create_unique_constraint("uq_alerts_rule_id_run_id_step", ["rule_id", "run_id", "step"])
        batch.drop_column("rewound_at")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("fork_step")
        batch.drop_column("parent_run_id")
