"""Reading many keys at once gives, key by key, what reading each key alone gives."""

from __future__ import annotations

import math

from mhpo_server.schemas import RecordIn, RunCreate
from mhpo_server.store import Store


def test_many_keys_at_once_equal_one_key_at_a_time(store: Store) -> None:
    run_id = store.create_run(RunCreate(project="p", name="r")).run_id
    records = []
    for s in range(3_000):
        scalars = {"dense": math.sin(s / 50.0), "spiky": 5.0 if s == 1_234 else 0.0}
        if s >= 1_000:
            scalars["late"] = float(s % 7)  # another extent, so another bucketing
        if s % 500 == 0:
            scalars["sparse"] = float(s)  # short enough to come back exactly
        if s == 2_000:
            scalars["dense"] = math.nan
        if s == 2_500:
            scalars["late"] = math.inf
        records.append(RecordIn(step=s, scalars=scalars))
    store.write_records(run_id, "b", records)
    flagged = [7, 1_500, 2_999]
    store.add_events(
        run_id, [{"step": s, "kind": "grad_spike", "severity": "warning", "detector": "d"} for s in flagged]
    )
    keys = ["late", "dense", "missing", "sparse", "spiky"]
    for start, end, max_points in [(None, None, 100), (None, None, 10_000), (900, 2_600, 50), (2_990, None, 20)]:
        together = store.get_scalars(run_id, keys, start, end, max_points)
        alone = {k: store.get_scalars(run_id, [k], start, end, max_points) for k in keys}
        assert list(together.series) == [k for k in keys if alone[k].series]
        for key, one in alone.items():
            if key in together.series:
                assert repr(together.series[key]) == repr(one.series[key]), (key, start, end, max_points)
        assert together.downsampled == any(one.downsampled for one in alone.values())
    out = store.get_scalars(run_id, keys, None, None, 100).series
    assert max(out["spiky"].max) == 5.0 and math.isinf(max(out["late"].max))
    assert any(math.isnan(v) for v in out["dense"].value)
    assert set(flagged) <= set(out["dense"].step) and set(flagged[1:]) <= set(out["late"].step)
