"""Stored tiers of scalar series: a downsampled read of a long series merges a few thousand stored
aggregates instead of aggregating every point of the range.

A tier of width W (`WIDTHS`: 16 x 4**k steps) holds, per run, key and bucket `step // W`, the
bucket's point count, NaN count, first step, sum, min and max (`ScalarTierRow`). A bucket's row
is written once the run has moved past it (the bucket is *sealed*: bucket < last_step // W), in
the transaction of the write that moved the run's last step. So a write inside open buckets
(one step per request, the common case) costs one comparison here; a write that seals buckets
aggregates them in SQL, the finest tier from the points and each coarser one from the tier
below, and each point is aggregated once per tier over the run's life. A write that lands
points in sealed buckets (a batch reaching back) rebuilds those buckets, a rewind drops the
buckets it reopens, and a fork copies the parent's buckets sealed at its fork step.

The invariant reads rely on: for every width, a key's bucket holding points has a row if and
only if it is sealed, and the row aggregates exactly the bucket's points. A read takes sealed
buckets inside its range from the rows and the rest (the edges of the range, the open tail of
the run) from the points, in one statement, so both come from one snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from sqlalchemy import Connection, TextClause, bindparam, text

WIDTHS = tuple(16 * 4**k for k in range(8))  # 16 .. 262,144 steps
TIER_SPAN = (
    4  # a response bucket spans >= 4 tier buckets: rounding its width up to the tier's costs <= 1/4 of the points
)
TIERED_MIN_STEPS = 50_000  # shorter ranges are aggregated from their points: as fast, with the exact bucket width
KEYS_PER_STATEMENT = 500  # keys per IN (...) list
NAN = math.nan
COLUMNS = "run_id, key, width, bucket, n, nans, first_step, vsum, vcount, vmin, vmax"
# A tier row's sum is NULL (SQLite turns NaN into NULL) or NaN when +Infinity and -Infinity met in it.
BAD_SUM = "CASE WHEN vsum IS NULL AND vcount > 0 THEN 1 ELSE 0 END"

Point = tuple[float, float, float]  # (mean, min, max) of a response bucket


def _keys(sql: str) -> TextClause:
    return text(sql).bindparams(bindparam("keys", expanding=True))


FROM_POINTS = _keys(
    f"INSERT INTO scalar_tiers ({COLUMNS}) "
    "SELECT run_id, key, :width, bucket, COUNT(*), SUM(is_nan), MIN(step), SUM(value), COUNT(value), "
    "MIN(value), MAX(value) "
    "FROM (SELECT run_id, key, step, value, is_nan, step / :width AS bucket FROM scalars "
    "WHERE run_id = :rid AND key IN :keys AND step >= :lo AND step < :hi) AS points "
    "GROUP BY run_id, key, bucket"
)
FROM_TIER = _keys(
    f"INSERT INTO scalar_tiers ({COLUMNS}) "
    "SELECT run_id, key, :width, up, SUM(n), SUM(nans), MIN(first_step), "
    f"CASE WHEN MAX({BAD_SUM}) = 1 THEN NULL ELSE SUM(vsum) END, SUM(vcount), MIN(vmin), MAX(vmax) "
    "FROM (SELECT run_id, key, n, nans, first_step, vsum, vcount, vmin, vmax, bucket / :ratio AS up "
    "FROM scalar_tiers WHERE run_id = :rid AND key IN :keys AND width = :lower "
    "AND bucket >= :lo AND bucket < :hi) AS tier "
    "GROUP BY run_id, key, up"
)
DROP = _keys(
    "DELETE FROM scalar_tiers WHERE run_id = :rid AND key IN :keys AND width = :width "
    "AND bucket >= :b0 AND bucket < :b1"
)
REOPEN = text("DELETE FROM scalar_tiers WHERE run_id = :rid AND bucket >= :step / width")
COPY = text(
    f"INSERT INTO scalar_tiers ({COLUMNS}) "
    "SELECT :child, key, width, bucket, n, nans, first_step, vsum, vcount, vmin, vmax FROM scalar_tiers "
    "WHERE run_id = :rid AND bucket < :step / width"
)
LAST_STEP = text("SELECT last_step FROM runs WHERE run_id = :rid")
_POINT_PARTS = (
    "SELECT step / :w AS r, step AS first_step, 1 AS n, is_nan AS nans, value AS vsum, "
    "CASE WHEN value IS NULL THEN 0 ELSE 1 END AS vcount, value AS vmin, value AS vmax, 0 AS bad "
    "FROM scalars WHERE run_id = :rid AND key = :key AND step >= :{0} AND step < :{1}"
)
READ = text(
    "SELECT MIN(first_step), SUM(n), SUM(nans), SUM(vsum), SUM(vcount), MIN(vmin), MAX(vmax), MAX(bad) FROM ("
    f"SELECT bucket / :m AS r, first_step, n, nans, vsum, vcount, vmin, vmax, {BAD_SUM} AS bad "
    "FROM scalar_tiers WHERE run_id = :rid AND key = :key AND width = :tw AND bucket >= :b0 AND bucket < :b1 "
    f"UNION ALL {_POINT_PARTS.format('head0', 'head1')} "
    f"UNION ALL {_POINT_PARTS.format('tail0', 'tail1')}"
    ") AS parts GROUP BY r"
)


def bucket_width(lo: int, hi: int, max_points: int, unit: int = 1) -> int:
    """The width (a multiple of `unit`) of the buckets `step // width` that cover steps [lo, hi] in at
    most `max_points` buckets: ceil(steps / max_points) rounded up to `unit` when that fits, else
    the width that always fits (the range then straddles one bucket boundary fewer)."""
    width = _ceil(_ceil(hi - lo + 1, max_points), unit) * unit
    if hi // width - lo // width < max_points:
        return width
    if max_points == 1:
        return unit * (hi // unit + 1)
    return max(width + unit, _ceil(_ceil(hi - lo, max_points - 1), unit) * unit)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def tier_for(lo: int, hi: int, max_points: int) -> int | None:
    """The tier width to read steps [lo, hi] at `max_points` from: the coarsest one that a response
    bucket spans `TIER_SPAN` times; None when the range is read from its points."""
    steps = hi - lo + 1
    if steps < TIERED_MIN_STEPS:
        return None
    fitting = [w for w in WIDTHS if w * TIER_SPAN <= _ceil(steps, max_points)]
    return fitting[-1] if fitting else None


def last_step(conn: Connection, run_id: str) -> int | None:
    return conn.execute(LAST_STEP, {"rid": run_id}).scalar()


def read(
    conn: Connection, run_id: str, key: str, lo: int, hi: int, width: int, tier: int, run_last: int
) -> tuple[dict[int, Point], bool]:
    """Buckets `step // width` of one key's steps [lo, hi] (its first and last in range): {first step: point}.

    The tier's sealed buckets inside [lo, hi] come from their rows; the head and tail of the
    range around them from the points. Per bucket: value = mean (NaN if the bucket holds a NaN),
    min/max ignore NaN and keep +-Infinity. Also returns whether any bucket merged several points.
    """
    b0 = _ceil(lo, tier)
    b1 = max(b0, min((hi + 1) // tier, run_last // tier))
    params = {
        "rid": run_id,
        "key": key,
        "tw": tier,
        "m": width // tier,
        "w": width,
        "b0": b0,
        "b1": b1,
        "head0": lo,
        "head1": min(b0 * tier, hi + 1),
        "tail0": max(b1 * tier, lo),
        "tail1": hi + 1,
    }
    points: dict[int, Point] = {}
    merged = False
    for step, n, nans, vsum, vcount, vmin, vmax, bad in conn.execute(READ, params):
        value = NAN if nans or bad or vsum is None else vsum / vcount
        points[int(step)] = (value, NAN if vmin is None else vmin, NAN if vmax is None else vmax)
        merged = merged or n > 1
    return points, merged


def _chunks(keys: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(keys), KEYS_PER_STATEMENT):
        yield list(keys[i : i + KEYS_PER_STATEMENT])


def _build(conn: Connection, run_id: str, keys: Sequence[str], level: int, b0: int, b1: int) -> None:
    """Write the rows of buckets [b0, b1) of tier `level` for `keys`, from the points or the tier below."""
    width = WIDTHS[level]
    # The bounds in the source's units are computed here: PostgreSQL types a small parameter as smallint.
    ratio = width if level == 0 else width // WIDTHS[level - 1]
    for chunk in _chunks(keys):
        params = {"rid": run_id, "keys": chunk, "width": width, "lo": b0 * ratio, "hi": b1 * ratio}
        if level == 0:
            conn.execute(FROM_POINTS, params)
        else:
            conn.execute(FROM_TIER, {**params, "lower": WIDTHS[level - 1], "ratio": ratio})


def after_write(
    conn: Connection,
    run_id: str,
    old_last: int | None,
    new_last: int,
    back: Iterable[tuple[str, int]],
    run_keys: Callable[[], list[str]],
) -> None:
    """Keep the tiers true after a write that moved the run's last step from `old_last` to `new_last`.

    `back`: the (key, step) of the new points at or before `old_last` (only a write reaching back
    has any); `run_keys` lists the run's keys, asked only when buckets seal.
    """
    old = -1 if old_last is None else old_last
    reopened = [(k, s) for k, s in back if s // WIDTHS[0] < old // WIDTHS[0]]
    back_keys = sorted({k for k, _ in reopened})
    back_lo = min((s for _, s in reopened), default=0)
    back_hi = max((s for _, s in reopened), default=0)
    keys: list[str] | None = None
    for level, width in enumerate(WIDTHS):
        seal0, seal1 = max(old // width, 0), new_last // width
        back0, back1 = back_lo // width, min(back_hi // width + 1, old // width)
        if back_keys and back1 > back0:
            for chunk in _chunks(back_keys):
                conn.execute(DROP, {"rid": run_id, "keys": chunk, "width": width, "b0": back0, "b1": back1})
            _build(conn, run_id, back_keys, level, back0, back1)
        elif seal1 <= seal0:
            return  # nothing sealed or reopened at this width, so none at the coarser ones
        if seal1 > seal0:
            keys = run_keys() if keys is None else keys
            _build(conn, run_id, keys, level, seal0, seal1)


def after_rewind(conn: Connection, run_id: str, step: int) -> None:
    """Drop the buckets a rewind to `step` reopens (all of them when `step` < 0)."""
    conn.execute(REOPEN, {"rid": run_id, "step": max(step, -1)})


def after_fork(conn: Connection, parent: str, child: str, step: int) -> None:
    """Give a run forked at `step` the parent's buckets sealed at that step (all of their points are <= step)."""
    conn.execute(COPY, {"rid": parent, "child": child, "step": step})
