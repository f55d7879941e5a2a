"""Scalar tiers: per-bucket aggregates of every scalar key at widths 64 x 16**k steps, for downsampled reads.

The upgrade builds the tiers of the stored data: every bucket a run's last step is past (a
sealed bucket), the finest width from the points, each coarser one from the width below.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from itertools import pairwise

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

WIDTHS = tuple(64 * 16**k for k in range(5))  # as mhpo_server.store.tiers.WIDTHS when this revision was written
COLUMNS = "run_id, key, width, bucket, n, nans, first_step, vsum, vcount, vmin, vmax"


def upgrade() -> None:
    op.create_table(
        "scalar_tiers",
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("key", sa.String(250), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("nans", sa.Integer(), nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("vsum", sa.Double(), nullable=True),
        sa.Column("vcount", sa.Integer(), nullable=False),
        sa.Column("vmin", sa.Double(), nullable=True),
        sa.Column("vmax", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "key", "width", "bucket", name="pk_scalar_tiers"),
        sqlite_with_rowid=False,
    )
    op.execute(
        f"INSERT INTO scalar_tiers ({COLUMNS}) "
        f"SELECT p.run_id, p.key, {WIDTHS[0]}, p.bucket, COUNT(*), SUM(p.is_nan), MIN(p.step), SUM(p.value), "
        "COUNT(p.value), MIN(p.value), MAX(p.value) "
        f"FROM (SELECT s.run_id, s.key, s.step, s.value, s.is_nan, s.step / {WIDTHS[0]} AS bucket "
        "FROM scalars s JOIN runs r ON r.run_id = s.run_id "
        f"WHERE s.step < r.last_step / {WIDTHS[0]} * {WIDTHS[0]}) AS p "
        "GROUP BY p.run_id, p.key, p.bucket"
    )
    for lower, width in pairwise(WIDTHS):
        ratio = width // lower
        op.execute(
            f"INSERT INTO scalar_tiers ({COLUMNS}) "
            f"SELECT t.run_id, t.key, {width}, t.up, SUM(t.n), SUM(t.nans), MIN(t.first_step), "
            "CASE WHEN MAX(CASE WHEN t.vsum IS NULL AND t.vcount > 0 THEN 1 ELSE 0 END) = 1 THEN NULL "
            "ELSE SUM(t.vsum) END, SUM(t.vcount), MIN(t.vmin), MAX(t.vmax) "
            f"FROM (SELECT l.run_id, l.key, l.n, l.nans, l.first_step, l.vsum, l.vcount, l.vmin, l.vmax, "
            f"l.bucket / {ratio} AS up FROM scalar_tiers l JOIN runs r ON r.run_id = l.run_id "
            f"WHERE l.width = {lower} AND l.bucket < r.last_step / {width} * {ratio}) AS t "
            "GROUP BY t.run_id, t.key, t.up"
        )


def downgrade() -> None:
    op.drop_table("scalar_tiers")
