"""The listener's in-memory windows give exactly the flags of a cold evaluation from the store."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import mhpo_migrations
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.monitoring import History, detect
from tests.flags.synthetic import Stream, generate_stream


@pytest.fixture
def app(db_url: str) -> Iterator[FastAPI]:
    mhpo_migrations.upgrade(db_url)
    app = create_app(Settings(db=db_url))
    with TestClient(app):
        yield app


def post(client: TestClient, run_id: str, records: list[dict[str, Any]], batch_id: str | None = None) -> dict[str, Any]:
    body = json.dumps({"batch_id": batch_id or uuid.uuid4().hex, "records": records})
    r = client.post(f"/api/v1/runs/{run_id}/records", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def flags(client: TestClient, run_id: str) -> list[tuple[Any, ...]]:
    found = client.get(f"/api/v1/runs/{run_id}/events").json()["events"]
    return sorted(
        (e["step"], e["kind"], e["severity"], e["message"], json.dumps(e["evidence"], sort_keys=True))
        for e in found
        if e["type"] == "flag"
    )


def new_run(client: TestClient) -> str:
    r = client.post("/api/v1/runs", json={"project": "p", "name": f"run-{uuid.uuid4().hex[:6]}"})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


def stream_with_events() -> Stream:
    stream = generate_stream(5, 360, "collapse", onset=200)
    stream.scalars["grad/norm"][120] *= 40.0
    stream.scalars["train/loss"][300] = math.nan
    return stream


# (start, stop) slices: in order, overlapping, a gap filled later (out of order), single steps.
SCHEDULE = [(0, 50), (50, 51), (40, 90), (120, 160), (90, 120), (160, 161), (161, 250), (250, 360), (300, 310)]


def test_warm_windows_give_the_flags_of_cold_reads(app: FastAPI) -> None:
    stream = stream_with_events()
    client = TestClient(app)
    warm, cold = new_run(client), new_run(client)
    monitor = app.state.flag_monitor
    warm_batches = 0
    for start, stop in SCHEDULE:
        warm_batches += monitor.cache.get(warm) is not None
        post(client, warm, stream.records(start, stop))
        post(client, cold, stream.records(start, stop))
        monitor.cache.drop(cold)  # every batch of this run is evaluated from a cold read of the store
    assert warm_batches >= 5, "most batches of the first run ran on cached windows"
    got = flags(client, warm)
    assert got == flags(client, cold)
    assert {(s, k) for s, k, *_ in got} >= {(120, "grad_spike"), (300, "non_finite")}
    assert any(k == "collapse" for _, k, *_ in got)


def test_in_order_batches_match_evaluating_the_whole_stream(app: FastAPI) -> None:
    stream = stream_with_events()
    client = TestClient(app)
    run_id = new_run(client)
    for start in range(0, 360, 7):
        post(client, run_id, stream.records(start, min(start + 7, 360)))
    whole = detect(History(stream.points()), range(360))
    assert [(s, k) for s, k, *_ in flags(client, run_id)] == sorted((f.step, f.kind) for f in whole)
    resent = post(client, run_id, stream.records(100, 200))
    assert resent["accepted"] == 0
    assert len(flags(client, run_id)) == len(whole)


def test_a_restarted_server_seeds_its_windows_from_the_store(db_url: str) -> None:
    mhpo_migrations.upgrade(db_url)
    stream = stream_with_events()
    with TestClient(create_app(Settings(db=db_url))) as client:
        run_id = new_run(client)
        post(client, run_id, stream.records(0, 110))
    with TestClient(create_app(Settings(db=db_url))) as client:
        for start in range(110, 360, 25):
            post(client, run_id, stream.records(start, start + 25))
        whole = detect(History(stream.points()), range(360))
        assert [(s, k) for s, k, *_ in flags(client, run_id)] == sorted((f.step, f.kind) for f in whole)


def test_rule_and_parameter_changes_apply_to_the_next_batch(app: FastAPI) -> None:
    client = TestClient(app)
    run_id = new_run(client)
    post(client, run_id, [{"step": s, "scalars": {"kl": 0.0}} for s in range(10)])
    rule = client.post(
        "/api/v1/alert-rules",
        json={
            "name": "kl",
            "project": "p",
            "cooldown_s": 0,
            "condition": {"type": "threshold", "key": "kl", "op": ">", "value": 1.0},
        },
    )
    assert rule.status_code == 201, rule.text
    post(client, run_id, [{"step": 10, "scalars": {"kl": 2.0}}])
    alerts = client.get("/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]
    assert [a["step"] for a in alerts] == [10]
    assert client.patch(f"/api/v1/alert-rules/{rule.json()['id']}", json={"enabled": False}).status_code == 200
    post(client, run_id, [{"step": 11, "scalars": {"kl": 0.0}}, {"step": 12, "scalars": {"kl": 3.0}}])
    assert len(client.get("/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]) == 1
    off = client.put("/api/v1/projects/p/flag-params", json={"non_finite": {"enabled": False}})
    assert off.status_code == 200, off.text
    post(client, run_id, [{"step": 13, "scalars": {"kl": math.nan}}])
    assert not [f for f in flags(client, run_id) if f[1] == "non_finite"]


def test_keys_no_detector_reads_cost_no_window_and_still_flag_when_they_turn_non_finite(app: FastAPI) -> None:
    """A batch of many new custom keys, finite at every step, is neither read back nor held in the
    windows; a key that turns NaN later is flagged as before, also right after a quiet batch."""
    client = TestClient(app)
    run_id = new_run(client)
    wide = {f"custom/k{i:04d}": 1.0 for i in range(2000)}
    post(client, run_id, [{"step": s, "scalars": {**wide, "train/loss": 1.0}} for s in range(3)])
    windows = app.state.flag_monitor.cache.get(run_id)
    assert windows is not None and not [k for k in windows.series if k.startswith("custom/")]
    post(client, run_id, [{"step": 3, "scalars": {"custom/k0007": math.nan}}])
    post(client, run_id, [{"step": 4, "scalars": {"custom/k0007": 2.0}}])
    post(client, run_id, [{"step": 5, "scalars": {"custom/k0007": -math.inf}}])
    found = [(step, kind, evidence) for step, kind, _s, _m, evidence in flags(client, run_id) if kind == "non_finite"]
    assert [(step, json.loads(evidence)["values"]) for step, _k, evidence in found] == [
        (3, {"custom/k0007": "NaN"}),
        (5, {"custom/k0007": "-Infinity"}),
    ]
