"""Stored tiers of scalar series: a downsampled read of a long series merges a few thousand stored
aggregates instead of aggregating every point of the range.

A tier of width W (`WIDTHS`: 64 x 16**k steps) holds, per run, key and bucket `step // W`, the
bucket's point count, NaN count, first step, sum, min and max (`ScalarTierRow`). A bucket's row
is written once the run has moved past it (the bucket is *sealed*: bucket < last_step // W), in
the transaction of the write that moved the run's last step. The finest tier of an append is
aggregated in memory from the write's own rows (numpy), with the bucket the previous append
left open remembered rather than read back (`TierUpkeep`); a coarser tier is aggregated in
SQL from the tier below, once per bucket (every 1,024 steps at most). A write inside open buckets (one step per request)
costs a comparison and, once per 64 steps, one aggregate of the last 64 steps read back. A
write that lands points in sealed buckets (a batch reaching back) rebuilds those buckets, a
rewind drops the buckets it reopens, and a fork copies the parent's buckets sealed at its step.

The invariant reads rely on: for every width, a key's bucket holding points has a row if and
only if it is sealed, and the row aggregates exactly the bucket's points. A read takes sealed
buckets inside its range from the rows and the rest (the edges of the range, the open tail of
the run) from the points, in one statement, so both come from one snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np
from sqlalchemy import Connection, TextClause, bindparam, text

WIDTHS = tuple(64 * 16**k for k in range(5))  # 64 .. 4,194,304 steps: a row per 64 points, and a few per 1,024
ROUNDING = 1.5  # a tiered read's bucket width is at most this times the ideal one (>= 2/3 of the points)
TIERED_MIN_STEPS = 50_000  # shorter ranges are aggregated from their points: as fast, with the exact bucket width
KEYS_PER_STATEMENT = 500  # keys per IN (...) list
NUMPY_ROWS = 256  # rows from which buckets are aggregated with numpy
OPEN_ROWS = 2048  # rows of an open bucket kept as they are before being merged into its aggregates (~300 kB)
NAN = math.nan
AGG_FIELDS = ("run_id", "key", "width", "bucket", "n", "nans", "first_step", "vsum", "vcount", "vmin", "vmax")
COLUMNS = ", ".join(AGG_FIELDS)
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
    """The tier width to read steps [lo, hi] at `max_points` from: the coarsest one whose multiple
    nearest above the ideal bucket width stays within `ROUNDING` of it; None when the range is read
    from its points."""
    steps = hi - lo + 1
    if steps < TIERED_MIN_STEPS:
        return None
    ideal = _ceil(steps, max_points)
    fitting = [w for w in WIDTHS if _ceil(ideal, w) * w <= ideal * ROUNDING]
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
    ratio = width // WIDTHS[level - 1] if level else width
    # Bounds in the source's units are computed here: PostgreSQL types a small parameter as smallint.
    params = {"rid": run_id, "width": width, "lo": b0 * ratio, "hi": b1 * ratio}
    for chunk in _chunks(keys):
        if level:
            conn.execute(FROM_TIER, {**params, "keys": chunk, "lower": WIDTHS[level - 1], "ratio": ratio})
        else:
            conn.execute(FROM_POINTS, {**params, "keys": chunk})


# A bucket's aggregate: (n, nans, first step, sum, count, min, max); sum, min and max over the points
# that are not NaN (None when there are none).
Agg = tuple[int, int, int, float | None, int, float | None, float | None]


def _merge(a: Agg, b: Agg) -> Agg:
    def pick(x: float | None, y: float | None, f: Callable[[float, float], float]) -> float | None:
        return y if x is None else x if y is None else f(x, y)

    return (
        a[0] + b[0],
        a[1] + b[1],
        min(a[2], b[2]),
        pick(a[3], b[3], float.__add__),
        a[4] + b[4],
        pick(a[5], b[5], min),
        pick(a[6], b[6], max),
    )


def aggregate(rows: Sequence[tuple[Any, ...]], width: int) -> dict[tuple[str, int], Agg]:
    """(key, bucket) -> aggregate of scalar rows (run_id, key, step, value or None for NaN, is_nan, time):
    a few vectorised numpy passes for a large write, plain Python for a small one (numpy's calls cost more)."""
    if len(rows) < NUMPY_ROWS:
        out: dict[tuple[str, int], Agg] = {}
        for _, key, step, value, is_nan, _ in rows:
            agg = (1, 1, step, None, 0, None, None) if is_nan else (1, 0, step, value, 1, value, value)
            cell = (key, step // width)
            out[cell] = _merge(out[cell], agg) if cell in out else agg
        return out
    names = list(map(itemgetter(1), rows))
    codes = {name: i for i, name in enumerate(dict.fromkeys(names))}
    code = np.array(list(map(codes.__getitem__, names)), dtype=np.int64)
    steps = np.array(list(map(itemgetter(2), rows)), dtype=np.int64)
    values = np.array(list(map(itemgetter(3), rows)), dtype=np.float64)  # None -> NaN
    order = np.lexsort((steps, code))
    code, steps, values = code[order], steps[order], values[order]
    buckets = steps // width
    starts = np.flatnonzero(np.r_[True, (code[1:] != code[:-1]) | (buckets[1:] != buckets[:-1])])
    nan = np.isnan(values)
    with np.errstate(invalid="ignore"):
        sums = np.add.reduceat(np.where(nan, 0.0, values), starts)
    n = np.diff(np.r_[starts, len(values)])
    nans = np.add.reduceat(nan.astype(np.int64), starts)
    firsts = np.minimum.reduceat(steps, starts)
    mins = np.fmin.reduceat(values, starts)
    maxs = np.fmax.reduceat(values, starts)
    keys = list(codes)
    out = {}
    columns = (code[starts], buckets[starts], n, nans, firsts, sums, mins, maxs)
    for c, bucket, count, nan_count, first, total, low, high in zip(*(a.tolist() for a in columns), strict=True):
        finite = count - nan_count
        out[(keys[c], bucket)] = (
            count,
            nan_count,
            first,
            total if finite else None,
            finite,
            low if finite else None,
            high if finite else None,
        )
    return out


@dataclass
class OpenBucket:
    """What a run's finest open bucket holds, as of the run's (last step, write_seq) `stamp`:
    aggregates per key (`merged`) plus rows not merged yet (`rows`, merged when they grow)."""

    stamp: tuple[int, int]
    bucket: int
    merged: dict[str, Agg] = field(default_factory=dict)
    rows: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, rows: Iterable[tuple[Any, ...]]) -> None:
        self.rows.extend(rows)
        if len(self.rows) > OPEN_ROWS:
            for (key, _), agg in aggregate(self.rows, WIDTHS[0]).items():
                self.merged[key] = _merge(self.merged[key], agg) if key in self.merged else agg
            self.rows = []


class TierUpkeep:
    """Keeps a database's tiers true on writes, rewinds and forks.

    It remembers, per run, what the finest bucket its last append left open holds, stamped with
    the run's last step and `write_seq` (its count of history changes) after that append. The
    next append, finding the run's row still so stamped (no other process wrote, nothing was
    rewound in between), seals that bucket without reading its points back: an append then
    costs a list extend, and once per bucket a numpy pass over the bucket's rows and one
    insert. Otherwise the points are read back.
    """

    MAX_RUNS = 256  # runs whose open bucket is remembered (<= ~80 MB); the oldest is forgotten first

    def __init__(self, insert: Callable[[Connection, list[tuple[Any, ...]]], None]) -> None:
        """`insert` writes new tier rows (tuples in `AGG_FIELDS` order) in bulk."""
        self._insert = insert
        self._open: dict[str, OpenBucket] = {}

    def after_write(
        self,
        conn: Connection,
        run_id: str,
        before: tuple[int | None, int],
        new_last: int,
        back: Iterable[tuple[str, int]],
        run_keys: Callable[[], list[str]],
        fresh: Sequence[tuple[Any, ...]] = (),
    ) -> None:
        """Keep the tiers true after a write that moves the run's (last step, write_seq) from `before`
        to (`new_last`, write_seq + 1).

        `back`: the (key, step) of the new points at or before the old last step (only a write
        reaching back has any); `run_keys` lists the run's keys, asked only when stored points are
        aggregated; `fresh`: the scalar rows of an append (every step after the old last step).
        """
        remembered = self._open.pop(run_id, None)
        old = -1 if before[0] is None else before[0]
        if remembered is not None and remembered.stamp != (old, before[1]):
            remembered = None
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
            elif seal1 <= seal0 and (level or not fresh):
                return  # nothing sealed or reopened at this width, so none at the coarser ones
            if level == 0 and fresh:
                self._append(conn, run_id, old, (new_last, before[1] + 1), fresh, remembered, run_keys)
            elif seal1 > seal0:
                keys = run_keys() if keys is None else keys
                _build(conn, run_id, keys, level, seal0, seal1)

    def _append(
        self,
        conn: Connection,
        run_id: str,
        old: int,
        stamp: tuple[int, int],
        fresh: Sequence[tuple[Any, ...]],
        remembered: OpenBucket | None,
        run_keys: Callable[[], list[str]],
    ) -> None:
        """The finest tier after an append: its sealed buckets written, its open one remembered."""
        width = WIDTHS[0]
        straddled, seal1 = old // width, stamp[0] // width  # the bucket holding `old` may hold stored points
        if old < 0:
            remembered = OpenBucket(stamp, straddled)
        elif remembered is not None and remembered.bucket != straddled:
            remembered = None
        if seal1 == straddled:  # nothing seals: the open bucket grows
            if remembered is not None:
                remembered.stamp = stamp
                remembered.add(fresh)
                self._remember(run_id, remembered)
            return
        seal0 = max(straddled, 0)
        start = seal1 * width  # the new open bucket's first step
        sealed = [row for row in fresh if row[2] < start]
        if remembered is None:
            _build(conn, run_id, run_keys(), 0, straddled, straddled + 1)  # its stored points read back
            seal0 = straddled + 1
            found = aggregate(sealed, width)
        else:
            found = aggregate(remembered.rows + sealed, width)
            for key, agg in remembered.merged.items():
                cell = (key, straddled)
                found[cell] = _merge(agg, found[cell]) if cell in found else agg
        self._insert(
            conn,
            [(run_id, key, width, bucket, *agg) for (key, bucket), agg in found.items() if seal0 <= bucket < seal1],
        )
        opened = OpenBucket(stamp, seal1)  # it holds only this write's points
        opened.add([row for row in fresh if row[2] >= start])
        self._remember(run_id, opened)

    def _remember(self, run_id: str, bucket: OpenBucket) -> None:
        self._open[run_id] = bucket
        if len(self._open) > self.MAX_RUNS:
            self._open.pop(next(iter(self._open)))

    def after_rewind(self, conn: Connection, run_id: str, step: int) -> None:
        """Drop the buckets a rewind to `step` reopens (all of them when `step` < 0)."""
        self._open.pop(run_id, None)
        conn.execute(REOPEN, {"rid": run_id, "step": max(step, -1)})

    def after_fork(self, conn: Connection, parent: str, child: str, step: int) -> None:
        """Give a run forked at `step` the parent's buckets sealed at that step (all of their points are <= step)."""
        conn.execute(COPY, {"rid": parent, "child": child, "step": step})
