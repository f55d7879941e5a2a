"""Stored tiers: a downsampled read merged from them equals the buckets aggregated from every point.

A model of the run's points (first write of a (key, step) wins, a rewind drops later steps, a
fork copies earlier ones) gives the expected buckets; the stored tier rows are checked against
it too (every sealed bucket has its exact row, nothing else is stored), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

import mhpo_migrations
from mhpo_server.schemas import EventCreate, RecordIn, RunCreate, ScalarsOut
from mhpo_server.store import SqlStore, Store, open_store, tiers

KEYS = ("a", "b", "c")
COLUMNS = ("value", "min", "max")
VALUES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(-400, 400).map(lambda i: i / 8),  # dyadic: sums are exact in any order, so means compare exactly
)
RECORD = st.tuples(st.integers(0, 300), st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1))
APPEND = st.tuples(
    st.integers(1, 20), st.lists(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1), max_size=40)
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.lists(RECORD, min_size=1, max_size=60)),
        st.tuples(st.sampled_from(["append", "append elsewhere"]), APPEND),
        st.tuples(st.just("rewind"), st.integers(-1, 300)),
        st.tuples(st.just("fork"), st.integers(0, 300)),
    ),
    min_size=1,
    max_size=12,
)
READS = st.lists(
    st.tuples(st.none() | st.integers(0, 300), st.none() | st.integers(0, 300), st.integers(2, 40)),
    min_size=1,
    max_size=4,
)


def same(a: float | None, b: float | None) -> bool:
    a = math.nan if a is None else a
    b = math.nan if b is None else b
    return (math.isnan(a) and math.isnan(b)) or a == b


@dataclass
class Model:
    """The points a run holds: key -> step -> value."""

    run_id: str
    points: dict[str, dict[int, float]] = field(default_factory=dict)

    def write(self, records: list[tuple[int, dict[str, float]]]) -> None:
        for step, scalars in records:
            for key, value in scalars.items():
                self.points.setdefault(key, {}).setdefault(step, value)

    def rewind(self, step: int) -> None:
        self.points = {k: {s: v for s, v in p.items() if s <= step} for k, p in self.points.items()}

    def fork(self, run_id: str, step: int) -> Model:
        return Model(run_id, {k: {s: v for s, v in p.items() if s <= step} for k, p in self.points.items()})


def aggregate(values: list[tuple[int, float]]) -> tuple[int, int, int, float | None, int, float | None, float | None]:
    """(n, nans, first step, sum, count, min, max) of points, NaN left out of the sum, count, min and max."""
    finite = [v for _, v in values if not math.isnan(v)]
    return (
        len(values),
        len(values) - len(finite),
        min(s for s, _ in values),
        sum(finite) if finite else None,
        len(finite),
        min(finite, default=None),
        max(finite, default=None),
    )


def expected_scalars(
    model: Model, start: int | None, end: int | None, max_points: int, events: tuple[int, ...] = ()
) -> ScalarsOut:
    """The answer of get_scalars computed from the model: a downsampled key keeps its points at `events` exact
    (values; a flagged step that starts a bucket keeps the bucket's min/max)."""
    series: dict[str, Any] = {}
    downsampled = False
    for key in sorted(model.points):
        pts = sorted(
            (s, v) for s, v in model.points[key].items() if (start is None or s >= start) and (end is None or s <= end)
        )
        if not pts:
            continue
        lo, hi = pts[0][0], pts[-1][0]
        if hi - lo + 1 <= max_points:
            values = [v for _, v in pts]
            series[key] = {"step": [s for s, _ in pts], "value": values, "min": values, "max": values}
            continue
        width = tiers.bucket_width(lo, hi, max_points, tiers.tier_for(lo, hi, max_points) or 1)
        buckets: dict[int, list[tuple[int, float]]] = {}
        for s, v in pts:
            buckets.setdefault(s // width, []).append((s, v))
        by_step: dict[int, tuple[float, float, float]] = {}
        for members in buckets.values():
            n, nans, first, total, count, vmin, vmax = aggregate(members)
            mean = math.nan if nans or total is None else total / count
            by_step[first] = (mean, math.nan if vmin is None else vmin, math.nan if vmax is None else vmax)
            downsampled = downsampled or n > 1
        # A flagged point is exact; at a bucket's first step it keeps the bucket's min/max.
        by_step.update({s: (v, *by_step.get(s, (v, v, v))[1:]) for s, v in pts if s in events})
        steps = sorted(by_step)
        series[key] = {"step": steps, **{name: [by_step[s][i] for s in steps] for i, name in enumerate(COLUMNS)}}
    return ScalarsOut.model_validate({"run_id": model.run_id, "downsampled": downsampled, "series": series})


def assert_same_scalars(got: ScalarsOut, want: ScalarsOut, where: object) -> None:
    assert got.downsampled == want.downsampled, where
    assert list(got.series) == list(want.series), where
    for key, series in want.series.items():
        mine = got.series[key]
        assert mine.step == series.step, (where, key)
        for name in ("value", "min", "max"):
            a, b = getattr(mine, name), getattr(series, name)
            assert all(same(x, y) for x, y in zip(a, b, strict=True)), (where, key, name, a, b)


def assert_tiers_exact(store: SqlStore, model: Model) -> None:
    """Every sealed bucket (bucket < last_step // width) holding points has its exact row; no other row is stored."""
    last = store.get_run(model.run_id).last_step
    want = {}
    for width in tiers.WIDTHS:
        for key, pts in model.points.items():
            buckets: dict[int, list[tuple[int, float]]] = {}
            for s, v in pts.items():
                if last is not None and s // width < last // width:
                    buckets.setdefault(s // width, []).append((s, v))
            for bucket, members in buckets.items():
                want[(key, width, bucket)] = aggregate(members)
    query = text(
        "SELECT key, width, bucket, n, nans, first_step, vsum, vcount, vmin, vmax FROM scalar_tiers WHERE run_id = :r"
    )
    with store.engine.connect() as conn:
        got = {(k, w, b): tuple(rest) for k, w, b, *rest in conn.execute(query, {"r": model.run_id})}
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for cell, row in got.items():
        assert row[:3] == want[cell][:3] and row[4] == want[cell][4], (cell, row, want[cell])
        assert all(same(a, b) for a, b in zip(row[3:], want[cell][3:], strict=True)), (cell, row, want[cell])


@pytest.fixture
def small_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiers of 2, 8 and 32 steps, read from any range: short random streams reach every tier and edge."""
    monkeypatch.setattr(tiers, "WIDTHS", (2, 8, 32))
    monkeypatch.setattr(tiers, "TIERED_MIN_STEPS", 0)


def records_of(pairs: list[tuple[int, dict[str, float]]]) -> list[RecordIn]:
    return [RecordIn(step=s, time=1.7e9 + s, scalars=scalars) for s, scalars in pairs]


@given(ops=OPS, reads=READS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_tiered_reads_equal_reads_of_every_point(
    store: SqlStore, small_tiers: None, ops: list[tuple[str, Any]], reads: list[tuple[int | None, int | None, int]]
) -> None:
    """Random batches (out of order, repeated steps, NaN, +-Infinity), appends after the last step (here
    or through another store on the database, as another server process), rewinds, re-logging and forks."""
    elsewhere = SqlStore(store.engine)  # its own memory of open buckets, as another process has
    current = Model(store.create_run(RunCreate(project="p", name="r")).run_id)
    models = [current]
    for n, (op, arg) in enumerate(ops):
        if op == "write":
            store.write_records(current.run_id, f"b{n}", records_of(arg))
            current.write(arg)
        elif op.startswith("append"):
            last = store.get_run(current.run_id).last_step
            gap, steps = arg
            first = (-1 if last is None else last) + gap
            pairs = [(first + i, scalars) for i, scalars in enumerate(steps)]
            (elsewhere if op == "append elsewhere" else store).write_records(current.run_id, f"b{n}", records_of(pairs))
            current.write(pairs)
        elif op == "rewind":
            store.rewind(current.run_id, arg)
            current.rewind(arg)
        else:
            last = store.get_run(current.run_id).last_step
            if last is None:
                continue
            child = store.fork(current.run_id, min(arg, last), None)
            current = current.fork(child.run_id, min(arg, last))
            models.append(current)
    for model in models:
        assert_tiers_exact(store, model)
        events = tuple(e.step for e in store.list_events(model.run_id))  # rewinds and forks: kept exact as flags are
        for start, end, max_points in reads:
            if start is not None and end is not None and start > end:
                start, end = end, start
            got = store.get_scalars(model.run_id, list(KEYS), start, end, max_points)
            want = expected_scalars(model, start, end, max_points, events)
            assert_same_scalars(got, want, (start, end, max_points))


def long_series(store: Store, steps: int) -> Model:
    """One key of `steps` steps with a NaN, +-Infinity and a spike, written in batches of 1,000 steps."""
    model = Model(store.create_run(RunCreate(project="p", name="long")).run_id)
    special = {777: math.nan, 31_313: math.inf, 31_314: -math.inf, 54_321: 1e6, 60_000: math.nan}
    for first in range(0, steps, 1_000):
        pairs = [(s, {"x": special.get(s, float(s % 13) / 4)}) for s in range(first, min(first + 1_000, steps))]
        store.write_records(model.run_id, f"b{first}", records_of(pairs))
        model.write(pairs)
    return model


@pytest.mark.parametrize(
    ("start", "end", "max_points"), [(None, None, 500), (12_345, None, 250), (3, 67_891, 250), (5_000, 60_000, 97)]
)
def test_a_long_series_reads_from_the_tiers_exactly(
    store: SqlStore, start: int | None, end: int | None, max_points: int
) -> None:
    """The real widths: a 70,000-step key, ranges with unaligned edges; the stored rows are exact too."""
    model = long_series(store, 70_000)
    assert_tiers_exact(store, model)
    got = store.get_scalars(model.run_id, ["x"], start, end, max_points)
    lo, hi = start or 0, min(end or 69_999, 69_999)
    assert tiers.tier_for(lo, hi, max_points) is not None, "the range is read from the tiers"
    assert max_points // 2 <= len(got.series["x"].step) <= max_points
    assert_same_scalars(got, expected_scalars(model, start, end, max_points), (start, end, max_points))


def test_flagged_steps_stay_exact_in_a_tiered_read(store: SqlStore) -> None:
    model = long_series(store, 70_000)
    store.add_events(model.run_id, [EventCreate(step=54_321, kind="grad_spike", severity="warning", detector="d")])
    assert tiers.tier_for(0, 69_999, 500) is not None
    series = store.get_scalars(model.run_id, ["x"], None, None, 500).series["x"]
    i = series.step.index(54_321)
    assert series.value[i] == series.min[i] == series.max[i] == 1e6
    assert min(series.min) == -math.inf and max(series.max) == math.inf
    assert any(math.isnan(v) for v in series.value)


def test_a_flagged_step_that_starts_a_tiered_bucket_keeps_the_buckets_spike(store: SqlStore) -> None:
    model = long_series(store, 70_000)
    width = tiers.bucket_width(0, 69_999, 500, tiers.tier_for(0, 69_999, 500) or 1)
    start = 54_321 // width * width  # the bucket holding the 1e6 spike begins here
    assert start != 54_321
    store.add_events(model.run_id, [EventCreate(step=start, kind="grad_spike", severity="warning", detector="d")])
    series = store.get_scalars(model.run_id, ["x"], None, None, 500).series["x"]
    i = series.step.index(start)
    assert series.value[i] == model.points["x"][start], "the flagged step's own value"
    assert series.max[i] == 1e6, "the bucket's max: its spike"


@pytest.fixture
def legacy_url(migrated_url: str) -> str:
    """A database at revision 0003 (before the tiers), emptied of the head's tables by a downgrade."""
    command.downgrade(mhpo_migrations.config(migrated_url), "0003")
    return migrated_url


def test_upgrade_builds_the_tiers_of_stored_data(legacy_url: str) -> None:
    """Points stored before the tiers existed: the upgrade writes the rows of every sealed bucket."""
    engine = create_engine(legacy_url)
    points = {s: (math.nan if s == 4_100 else float(s % 97)) for s in range(0, 200_000, 10)}
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO projects (name, created_at) VALUES ('p', 0)"))
        conn.execute(
            text(
                "INSERT INTO runs (run_id, project_id, name, status, created_at, updated_at, last_step) "
                "SELECT '00000000-0000-4000-8000-000000000001', id, 'old', 'running', 0, 0, 199990 FROM projects"
            )
        )
        conn.execute(
            text(
                "INSERT INTO scalars (run_id, key, step, value, is_nan, time) "
                "VALUES ('00000000-0000-4000-8000-000000000001', 'x', :s, :v, :n, 0)"
            ),
            [{"s": s, "v": None if math.isnan(v) else v, "n": int(math.isnan(v))} for s, v in points.items()],
        )
    engine.dispose()
    mhpo_migrations.upgrade(legacy_url)
    store = open_store(legacy_url)
    try:
        assert isinstance(store, SqlStore)
        model = Model("00000000-0000-4000-8000-000000000001", {"x": points})
        assert_tiers_exact(store, model)
        got = store.get_scalars(model.run_id, ["x"], None, None, 1_000)
        assert_same_scalars(got, expected_scalars(model, None, None, 1_000), "after the upgrade")
    finally:
        store.close()
