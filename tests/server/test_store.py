"""The SQL store on SQLite and PostgreSQL: idempotent, all-or-nothing writes; exact reads; downsampling."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from mhpo_server.schemas import EventCreate, RecordIn, RunCreate
from mhpo_server.store import Conflict, NotFound, Store, open_store
from mhpo_server.store.models import ApiTokenRow, BatchRow, ScalarRow
from mhpo_server.store.series import merge_histograms

NONFINITE = {"nan": math.nan, "pinf": math.inf, "ninf": -math.inf, "zero": 0.0, "big": 1.5e308, "tiny": 5e-324}


def rec(step: int, **fields: object) -> RecordIn:
    return RecordIn.model_validate({"step": step, "time": 1_700_000_000.0 + step, **fields})


def hist(counts: list[int], lo: float = -2.0, hi: float = 2.0, **stats: float) -> dict[str, object]:
    base = {
        "lo": lo,
        "hi": hi,
        "counts": counts,
        "underflow": 1,
        "overflow": 2,
        "min": -3.0,
        "max": 3.0,
        "sum": 1.0,
        "sumsq": 9.0,
    }
    return {**base, **stats}


@pytest.fixture
def run_id(store: Store) -> str:
    return store.create_run(RunCreate(project="proj", name="run", loss="mhpo", config={"lr": 1e-6})).run_id


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_nonfinite_values_round_trip(store: Store, run_id: str) -> None:
    """NaN, +Inf and -Inf are stored and come back as themselves (SQLite alone would turn NaN into NULL)."""
    outliers = [{"sample": 0, "position": 3, "token_id": 7, "text": "tok", "x": math.inf, "A": -1.0, "zeta": math.nan}]
    h = hist([1, 2, 3, 4], sum=math.inf, sumsq=math.nan, max=math.inf)
    result = store.write_records(run_id, "b1", [rec(5, scalars=NONFINITE, histograms={"h": h}, outliers=outliers)])
    assert (result.accepted, result.duplicates) == (len(NONFINITE) + 2, 0)
    series = store.get_scalars(run_id, list(NONFINITE), None, None, 1000).series
    for key, value in NONFINITE.items():
        assert series[key].step == [5]
        assert same(series[key].value[0], value), (key, series[key].value)
    got = store.get_histograms(run_id, "h", None, None, 100)
    assert got.sum == [math.inf] and math.isnan(got.sumsq[0]) and got.max == [math.inf]
    out = store.get_outliers(run_id, None)
    assert out.step == 5 and out.outliers[0]["x"] == math.inf and math.isnan(out.outliers[0]["zeta"])


def test_nan_is_stored_explicitly(store: Store, run_id: str) -> None:
    store.write_records(run_id, "b1", [rec(0, scalars={"loss": math.nan})])
    with store.engine.connect() as conn:  # type: ignore[attr-defined]
        row = conn.execute(select(ScalarRow.value, ScalarRow.is_nan).where(ScalarRow.key == "loss")).one()
    assert tuple(row) == (None, 1)


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_url: str) -> None:
    store = open_store(sqlite_url, busy_timeout_ms=12_000)
    try:
        with store.engine.connect() as conn:  # type: ignore[attr-defined]
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 12_000
    finally:
        store.close()


def test_retried_batch_stores_nothing_twice(store: Store, run_id: str) -> None:
    batch = [rec(s, scalars={"a": float(s), "b": 2.0 * s}) for s in range(5)]
    first = store.write_records(run_id, "batch-1", batch)
    again = store.write_records(run_id, "batch-1", batch)
    assert (first.accepted, first.duplicates) == (10, 0)
    assert (again.accepted, again.duplicates, again.new_records) == (0, 10, [])


def test_overlapping_batch_stores_only_new_items(store: Store, run_id: str) -> None:
    store.write_records(run_id, "b1", [rec(s, scalars={"a": float(s)}) for s in range(5)])
    overlap = [rec(s, scalars={"a": -1.0, "c": 1.0}) for s in range(3, 8)]
    result = store.write_records(run_id, "b2", overlap)
    assert (result.accepted, result.duplicates) == (8, 2)
    new = {(r.step, k) for r in result.new_records for k in r.scalars}
    assert new == {(s, "c") for s in range(3, 8)} | {(s, "a") for s in range(5, 8)}
    series = store.get_scalars(run_id, ["a"], None, None, 1000).series["a"]
    assert series.step == list(range(8))
    assert series.value == [0.0, 1.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0], "first write wins"
    assert store.get_run(run_id).last_step == 7


def test_duplicate_steps_inside_one_batch(store: Store, run_id: str) -> None:
    result = store.write_records(run_id, "b1", [rec(1, scalars={"a": 1.0}), rec(1, scalars={"a": 2.0, "b": 0.0})])
    assert (result.accepted, result.duplicates) == (2, 1)
    assert store.get_scalars(run_id, ["a"], None, None, 10).series["a"].value == [1.0]


def test_batch_is_all_or_nothing(store: Store, run_id: str) -> None:
    """A write the database refuses half-way (a step no BIGINT holds, past the schema) leaves nothing behind."""
    unstorable = rec(2, outliers=[{"sample": 0, "position": 1, "x": 1.0, "A": 1.0}]).model_copy(update={"step": 2**70})
    bad = [rec(1, scalars={"a": 1.0}), unstorable]
    with pytest.raises(Exception):  # noqa: B017, PT011 - the driver's own overflow error, different per database
        store.write_records(run_id, "b1", bad)
    assert store.get_scalars(run_id, ["a"], None, None, 10).series == {}
    with store.engine.connect() as conn:  # type: ignore[attr-defined]
        assert conn.execute(select(BatchRow.batch_id).where(BatchRow.batch_id == "b1")).first() is None
    fixed = [rec(1, scalars={"a": 1.0}), rec(2, outliers=[{"sample": 0, "position": 1, "x": 1.0, "A": 1.0}])]
    assert store.write_records(run_id, "b1", fixed).accepted == 2, "a refused batch id may be retried"


def test_a_changed_binning_is_refused_alone(store: Store, run_id: str) -> None:
    store.write_records(run_id, "b0", [rec(0, histograms={"h": hist([1, 1, 1, 1])})])
    mixed = [rec(1, scalars={"a": 1.0}), rec(2, histograms={"h": hist([1, 1, 1]), "g": hist([1])})]
    result = store.write_records(run_id, "b1", mixed)
    assert (result.accepted, result.duplicates) == (2, 0)
    assert [(r.step, r.field, r.key) for r in result.rejected] == [(2, "histograms", "h")]
    assert "binning" in result.rejected[0].reason
    assert store.get_histograms(run_id, "h", None, None, 10).step == [0]
    assert store.get_histograms(run_id, "g", None, None, 10).step == [2]


def test_unknown_run(store: Store) -> None:
    with pytest.raises(NotFound):
        store.write_records(str(uuid.uuid4()), "b", [rec(0, scalars={"a": 1.0})])


def test_client_chosen_run_id_is_idempotent(store: Store) -> None:
    rid = uuid.uuid4()
    first = store.create_run(RunCreate(project="p", name="r", run_id=rid))
    again = store.create_run(RunCreate(project="p", name="r", run_id=rid))
    assert first.run_id == again.run_id == str(rid)
    with pytest.raises(Conflict):
        store.create_run(RunCreate(project="other", name="r", run_id=rid))
    assert [(p.name, p.runs) for p in store.list_projects()] == [("other", 0), ("p", 1)]


def test_downsampling_keeps_spikes_nonfinite_and_flagged_steps(store: Store, run_id: str) -> None:
    n = 10_000
    values = {s: float(s % 10) for s in range(n)}
    values[4321] = 1e6
    values[777] = math.nan
    values[888] = -math.inf
    store.write_records(run_id, "b", [rec(s, scalars={"x": v}) for s, v in values.items()])
    store.add_events(run_id, [EventCreate(step=5003, kind="grad_spike", severity="warning", detector="d")])
    out = store.get_scalars(run_id, ["x"], None, None, 100)
    series = out.series["x"]
    assert out.downsampled
    assert 100 <= len(series.step) <= 101
    assert series.step == sorted(series.step)
    assert max(series.max) == 1e6, "a one-step spike survives downsampling"
    assert min(series.min) == -math.inf
    i = series.step.index(5003)
    assert series.value[i] == series.min[i] == series.max[i] == 3.0, "flagged steps are exact"
    nan_bucket = max(s for s in series.step if s <= 777)
    assert math.isnan(series.value[series.step.index(nan_bucket)])
    finite_bucket = series.step.index(2000)
    assert series.value[finite_bucket] == pytest.approx(4.5)
    assert (series.min[finite_bucket], series.max[finite_bucket]) == (0.0, 9.0)
    window = store.get_scalars(run_id, ["x"], 100, 149, 100).series["x"]
    assert window.step == list(range(100, 150)), "a range under max_points is exact"


def test_a_flagged_step_that_starts_a_bucket_keeps_the_buckets_spike(store: Store, run_id: str) -> None:
    """The flag's point is exact, and the envelope of the bucket it starts still shows the bucket's spike."""
    store.write_records(
        run_id, "b", [rec(s, scalars={"x": 1e6 if s == 4321 else float(s % 10)}) for s in range(10_000)]
    )
    store.add_events(run_id, [EventCreate(step=4300, kind="grad_spike", severity="warning", detector="d")])
    series = store.get_scalars(run_id, ["x"], None, None, 100).series["x"]
    assert 4300 in series.step and 4321 not in series.step, "step 4300 starts the bucket holding the spike"
    i = series.step.index(4300)
    assert series.value[i] == 0.0, "the flagged step's own value"
    assert (series.min[i], series.max[i]) == (0.0, 1e6), "the bucket's min/max, spike included"


def test_histograms_merge_exactly(store: Store, run_id: str) -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(10, 8))
    records = [
        rec(
            s,
            histograms={
                "log_ratio": hist(
                    counts[s].tolist(),
                    underflow=s,
                    overflow=1,
                    min=-s - 1.0,
                    max=float(s),
                    sum=float(s),
                    sumsq=float(s * s),
                )
            },
        )
        for s in range(10)
    ]
    store.write_records(run_id, "b", records)
    full = store.get_histograms(run_id, "log_ratio", None, None, 100)
    assert full.step == full.step_end == list(range(10)) and full.counts == counts.tolist()
    merged = store.get_histograms(run_id, "log_ratio", None, None, 3)
    assert (merged.lo, merged.hi, merged.bins) == (-2.0, 2.0, 8)
    assert merged.step == [0, 4, 8] and merged.step_end == [3, 7, 9]
    assert merged.counts == [counts[0:4].sum(0).tolist(), counts[4:8].sum(0).tolist(), counts[8:10].sum(0).tolist()]
    assert merged.underflow == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9]
    assert merged.min == [-4.0, -8.0, -10.0] and merged.max == [3.0, 7.0, 9.0]
    assert merged.sumsq == [14.0, 126.0, 145.0]
    assert np.asarray(merged.counts).sum() == counts.sum()


def test_events_unique_and_open_flags(store: Store, run_id: str) -> None:
    flags = [
        {
            "step": 3,
            "kind": "hazard_spike",
            "severity": "critical",
            "detector": "mad",
            "message": "m",
            "evidence": {"value": math.inf, "baseline": 1.0},
        },
        {"step": 3, "kind": "on_policy", "severity": "info", "detector": "ratio"},
    ]
    assert store.add_events(run_id, flags) == 2
    assert store.add_events(run_id, flags) == 0
    events = store.list_events(run_id)
    assert [e.kind for e in events] == ["hazard_spike", "on_policy"]
    assert events[0].evidence == {"value": math.inf, "baseline": 1.0} and events[0].type == "flag"
    assert store.get_run(run_id).open_flags == 1, "info events are not open flags"


def test_keys_and_outliers(store: Store, run_id: str) -> None:
    o = {"sample": 1, "position": 2, "token_id": None, "text": "", "x": 0.5, "A": 1.0, "zeta": None}
    store.write_records(
        run_id,
        "b",
        [
            rec(2, scalars={"b": 1.0, "a/x": 2.0}, histograms={"psi": hist([1, 2])}, outliers=[o]),
            rec(6, scalars={"a/x": 1.0}, outliers=[{**o, "x": -0.5}]),
        ],
    )
    keys = store.list_keys(run_id)
    assert keys.scalars == ["a/x", "b"] and keys.histograms == ["psi"]
    assert store.get_outliers(run_id, 1).step is None
    assert store.get_outliers(run_id, 5).step == 2
    assert store.get_outliers(run_id, 100).outliers[0]["x"] == -0.5


def test_many_keys_and_flagged_steps(store: Store, run_id: str) -> None:
    """Long key and step lists stay under the databases' bind-parameter limits (IN lists are chunked)."""
    keys = [f"k/{i:05d}" for i in range(1_000)]
    store.write_records(run_id, "b", [rec(s, scalars={k: float(s) for k in keys}) for s in range(3)])
    series = store.get_scalars(run_id, keys, None, None, 10).series
    assert len(series) == 1_000 and all(s.step == [0, 1, 2] for s in series.values())
    store.write_records(run_id, "c", [rec(s, scalars={"long": float(s)}) for s in range(3, 3_000)])
    flagged = list(range(3, 3_000, 2))
    store.add_events(
        run_id, [{"step": s, "kind": "grad_spike", "severity": "warning", "detector": "d"} for s in flagged]
    )
    long = store.get_scalars(run_id, ["long"], None, None, 100).series["long"]
    assert set(flagged) <= set(long.step) and len(long.step) <= 100 + len(flagged)


def test_tokens_are_stored_hashed(store: Store) -> None:
    token = store.create_token("proj", "write")
    info = store.resolve_token(token)
    assert info is not None and (info.project, info.scope) == ("proj", "write")
    assert store.resolve_token(token + "x") is None
    with store.engine.connect() as conn:  # type: ignore[attr-defined]
        stored = conn.execute(select(ApiTokenRow.token_hash)).scalars().all()
    assert token not in stored and len(stored[0]) == 64


@given(
    counts=st.lists(st.lists(st.integers(0, 10**12), min_size=3, max_size=3), min_size=1, max_size=40),
    max_steps=st.integers(1, 50),
)
@settings(max_examples=60, deadline=None)
def test_histogram_merge_is_exact_property(counts: list[list[int]], max_steps: int) -> None:
    """Merged columns partition the steps in order and add up bin by bin, exactly (integers, no rounding)."""
    rows = [
        (
            10 * i,
            0.0,
            1.0,
            3,
            np.array([i, 1, *c], dtype="<i8").tobytes(),
            np.array([-i, i, 0.5, 0.25], dtype="<f8").tobytes(),
        )
        for i, c in enumerate(counts)
    ]
    merged = merge_histograms("k", rows, max_steps)
    assert len(merged.step) <= max_steps
    assert merged.step[0] == 0 and merged.step_end[-1] == 10 * (len(counts) - 1)
    assert all(b == e + 10 for e, b in zip(merged.step_end[:-1], merged.step[1:], strict=True)), (
        "columns tile the steps"
    )
    for first, last, column, under in zip(merged.step, merged.step_end, merged.counts, merged.underflow, strict=True):
        members = counts[first // 10 : last // 10 + 1]
        assert column == [sum(c[b] for c in members) for b in range(3)]
        assert under == sum(range(first // 10, last // 10 + 1))
    assert sum(map(sum, merged.counts)) == sum(map(sum, counts))
