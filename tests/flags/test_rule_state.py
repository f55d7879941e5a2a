"""Running rule state (`RuleStates`) gives exactly the firings of re-reading each rule's whole look-back.

`naive_firings` is the definition: at each new step, look at the last `for_steps` points
(threshold) or the `window_steps` points before (spike), now and one point earlier. The
running state must match it for batches in order, overlapping, out of order, after a
restart (a fresh state rebuilt from the stored points) and across a real server restart.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

import mhpo_migrations
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.monitoring.detectors import History
from mhpo_server.monitoring.rules import OPS, RuleStates, history_points
from mhpo_server.monitoring.schemas import MAX_RULES_PER_PROJECT, AlertRule, SpikeCondition, ThresholdCondition
from mhpo_server.monitoring.stats import MAD_TO_SIGMA, median, sorted_mad
from tests.fixtures.server import LiveServer


def _threshold_at(values: np.ndarray, end: int, cond: ThresholdCondition) -> bool:
    if end < cond.for_steps:
        return False
    return all(OPS[cond.op](float(v), cond.value) for v in values[end - cond.for_steps : end])


def _spike_at(values: np.ndarray, end: int, cond: SpikeCondition) -> bool:
    if end < 1 or not math.isfinite(values[end - 1]):
        return False
    window = values[max(0, end - 1 - cond.window_steps) : end - 1]
    window = window[np.isfinite(window)]
    if len(window) < cond.min_baseline:
        return False
    centre = median(window)
    scale = max(MAD_TO_SIGMA * median(np.abs(window - centre)), 1e-9 + 1e-4 * abs(centre))
    z = (float(values[end - 1]) - centre) / scale
    return {"up": z > cond.z, "down": z < -cond.z, "both": abs(z) > cond.z}[cond.direction]


def naive_firings(rules: Sequence[AlertRule], history: History, steps: Sequence[int]) -> list[tuple[int, int]]:
    """(step, rule id) of every firing, re-reading each rule's look-back at every step: O(look-back) per point."""
    out = []
    for rule in rules:
        cond = rule.condition
        for step in sorted(set(steps)):
            found = history.upto(cond.key, step)
            if found is None:
                continue
            values, n = found[1], len(found[1])
            if isinstance(cond, ThresholdCondition):
                fired = _threshold_at(values, n, cond) and not _threshold_at(values, n - 1, cond)
            else:
                assert isinstance(cond, SpikeCondition)
                fired = _spike_at(values, n, cond) and not _spike_at(values, n - 1, cond)
            if fired:
                out.append((step, rule.id))
    return sorted(out)


def make_rule(rule_id: int, condition: dict[str, Any]) -> AlertRule:
    return AlertRule.model_validate(
        {
            "id": rule_id,
            "name": f"r{rule_id}",
            "project": "p",
            "run_id": None,
            "condition": condition,
            "severity": "warning",
            "cooldown_s": 0.0,
            "channels": ["dashboard"],
            "webhook_url": None,
            "enabled": True,
            "created_at": 0.0,
            "updated_at": 0.0,
        }
    )


RULES = [
    make_rule(1, {"type": "threshold", "key": "x", "op": ">", "value": 0.0, "for_steps": 3}),
    make_rule(2, {"type": "threshold", "key": "x", "op": "!=", "value": 1.0, "for_steps": 1}),
    make_rule(3, {"type": "threshold", "key": "x", "op": "<=", "value": 0.5, "for_steps": 7}),
    make_rule(4, {"type": "spike", "key": "x", "direction": "both", "z": 2.0, "window_steps": 6, "min_baseline": 3}),
    make_rule(5, {"type": "spike", "key": "x", "direction": "up", "z": 1.0, "window_steps": 9, "min_baseline": 5}),
]
DEPTH = max(history_points(r) for r in RULES)


def window(points: dict[int, float], first: int, last: int) -> History:
    """What the listener hands the rules: DEPTH points before `first` and every point in [first, last]."""
    before = sorted(s for s in points if s < first)[-DEPTH:]
    inside = sorted(s for s in points if first <= s <= last)
    steps = before + inside
    return History.from_arrays({"x": (np.array(steps, dtype=np.int64), np.array([points[s] for s in steps]))})


values_st = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, 1e6, math.nan, math.inf]),
    st.floats(-10, 10, allow_nan=False),
)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(values_st, min_size=1, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    shuffle=st.randoms(use_true_random=False),
    restart_at=st.integers(0, 10),
)
def test_running_state_matches_the_naive_definition(
    values: list[float], cuts: list[int], shuffle: Any, restart_at: int
) -> None:
    """Batches cut anywhere, some sent out of order and some twice; a restart (fresh state) in between."""
    steps = list(range(0, 3 * len(values), 3))  # gaps between steps, as in a real run
    bounds = sorted({0, len(values), *(c for c in cuts if c < len(values))})
    batches = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
    if len(batches) > 2:
        i = shuffle.randrange(len(batches) - 1)
        batches[i], batches[i + 1] = batches[i + 1], batches[i]  # one out-of-order pair
        batches.append(batches[shuffle.randrange(len(batches))])  # and a re-sent batch
    stored: dict[int, float] = {}
    states = RuleStates()
    got: list[tuple[int, int]] = []
    want: list[tuple[int, int]] = []
    for n, batch in enumerate(batches):
        new = [steps[i] for i in batch if steps[i] not in stored]  # the store keeps the first value
        if not new:
            continue
        stored.update({steps[i]: values[i] for i in batch if steps[i] not in stored})
        if n == restart_at:
            states = RuleStates()
        history = window(stored, min(new), max(new))
        got += [(f.step, f.rule.id) for f in states.evaluate("run", RULES, history, new, [])]
        want += naive_firings(RULES, window(stored, min(new), max(new)), new)
    assert sorted(got) == sorted(want)


def test_a_streak_spans_batches_and_fires_once() -> None:
    rule = make_rule(1, {"type": "threshold", "key": "x", "op": ">", "value": 1.0, "for_steps": 4})
    states, stored, fired = RuleStates(), {}, []
    for batch in ([(0, 0.0), (1, 2.0)], [(2, 2.0)], [(3, 2.0), (4, 2.0), (5, 2.0)], [(6, 0.0), (7, 5.0)]):
        stored.update(batch)
        new = [s for s, _ in batch]
        fired += [f.step for f in states.evaluate("r", [rule], window(stored, new[0], new[-1]), new, [])]
    assert fired == [4]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40))
def test_mad_of_two_sorted_runs_equals_numpy(xs: list[float]) -> None:
    ordered = sorted(xs)
    centre = median(np.array(xs))
    assert sorted_mad(ordered, centre) == median(np.abs(np.array(xs) - centre))


def test_states_are_bounded_and_evaluation_stays_correct_when_evicted() -> None:
    states = RuleStates(max_cells=30)
    points = {s: float(s % 7) for s in range(200)}
    for run in range(20):
        states.evaluate(f"run{run}", RULES, window(points, 0, 99), list(range(100)), [])
    assert states._cells <= 30 + 1 + 9  # one state may sit above the bound alone
    fresh = RuleStates()
    evicted = [
        (f.step, f.rule.id) for f in states.evaluate("run0", RULES, window(points, 100, 199), list(range(100, 200)), [])
    ]
    kept = [
        (f.step, f.rule.id) for f in fresh.evaluate("run0", RULES, window(points, 100, 199), list(range(100, 200)), [])
    ]
    assert evicted == kept == naive_firings(RULES, window(points, 100, 199), list(range(100, 200)))


# --- a real server, killed between batches ---------------------------------------------------


@pytest.fixture
def server(db_url: str) -> Iterator[LiveServer]:
    with LiveServer(db_url) as live:
        yield live


def post(server: LiveServer, run_id: str, points: list[tuple[int, float]]) -> None:
    records = [{"step": s, "time": 1.7e9 + s, "scalars": {"loss": v}} for s, v in points]
    r = httpx.post(
        f"{server.url}/api/v1/runs/{run_id}/records",
        json={"batch_id": uuid.uuid4().hex, "records": records},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_state_is_rebuilt_from_the_store_after_a_restart(server: LiveServer) -> None:
    """A 5-step streak begun before a crash completes after it: one alert, at the fifth step, none twice."""
    run_id = httpx.post(f"{server.url}/api/v1/runs", json={"project": "p", "name": "r"}).json()["run_id"]
    for condition in (
        {"type": "threshold", "key": "loss", "op": ">", "value": 1.0, "for_steps": 5},
        {"type": "spike", "key": "loss", "direction": "up", "z": 5.0, "window_steps": 10, "min_baseline": 5},
    ):
        r = httpx.post(
            f"{server.url}/api/v1/alert-rules",
            json={"name": condition["type"], "project": "p", "condition": condition, "cooldown_s": 0},
        )
        assert r.status_code == 201, r.text
    post(server, run_id, [(s, 0.5 + 0.01 * (s % 3)) for s in range(10)])
    post(server, run_id, [(10, 2.0), (11, 2.0), (12, 2.0)])
    server.kill()
    server.start()
    post(server, run_id, [(13, 2.0)])
    post(server, run_id, [(14, 2.0), (15, 2.0)])
    server.kill()
    server.start()
    post(server, run_id, [(16, 0.5), (17, 2.0)])
    alerts = httpx.get(f"{server.url}/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]
    fired = sorted((a["rule_name"], a["step"]) for a in alerts)
    assert fired == [("spike", 10), ("threshold", 14)]


def test_rules_per_project_are_bounded(sqlite_url: str) -> None:
    """Every batch evaluates its project's rules: their number is capped (422 naming the project), others unaffected."""
    mhpo_migrations.upgrade(sqlite_url)
    condition = {"type": "threshold", "key": "loss", "op": ">", "value": 1.0}
    with TestClient(create_app(Settings(db=sqlite_url, dashboard=False))) as client:
        for i in range(MAX_RULES_PER_PROJECT):
            r = client.post("/api/v1/alert-rules", json={"name": f"r{i}", "project": "busy", "condition": condition})
            assert r.status_code == 201, r.text
        r = client.post("/api/v1/alert-rules", json={"name": "one more", "project": "busy", "condition": condition})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "project"], r.text
        assert f"{MAX_RULES_PER_PROJECT} alert rules" in r.text
        other = client.post("/api/v1/alert-rules", json={"name": "r", "project": "calm", "condition": condition})
        assert other.status_code == 201
