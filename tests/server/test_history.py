"""Rewind, fork and partial refusal of records against a real `mhpo serve` process, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import mhpo_migrations
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from tests.conftest import strict_loads
from tests.fixtures.server import LiveServer
from tests.flags.synthetic import generate_stream


class Api:
    """A thin JSON client of one live server (non-finite numbers read back as floats)."""

    def __init__(self, server: LiveServer) -> None:
        self.http = httpx.Client(base_url=server.url, timeout=30.0)

    def call(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        content = None if body is None else json.dumps(body)
        response = self.http.request(method, path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        return strict_loads(response.text)

    def new_run(self, name: str = "run") -> str:
        return self.call("POST", "/api/v1/runs", {"project": "p", "name": name}, 201)["run_id"]

    def post(self, run_id: str, records: list[dict[str, Any]], batch_id: str | None = None) -> dict[str, Any]:
        return self.call(
            "POST", f"/api/v1/runs/{run_id}/records", {"batch_id": batch_id or uuid.uuid4().hex, "records": records}
        )

    def series(self, run_id: str, key: str) -> dict[int, float]:
        found = self.call("GET", f"/api/v1/runs/{run_id}/scalars?keys={key}&max_points=10000")["series"]
        return dict(zip(found[key]["step"], found[key]["value"], strict=True)) if key in found else {}

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/api/v1/runs/{run_id}/events")["events"]


@pytest.fixture
def api(live_server_db: LiveServer) -> Api:
    return Api(live_server_db)


def histogram(lo: float = 0.0) -> dict[str, Any]:
    return {"lo": lo, "hi": lo + 1.0, "counts": [1, 2, 3]}


def test_rewind_then_relog_new_values_win_and_flags_follow_the_new_history(api: Api) -> None:
    run_id = api.new_run()
    api.call(
        "POST",
        "/api/v1/alert-rules",
        {
            "name": "probe high",
            "project": "p",
            "cooldown_s": 0,
            "condition": {"type": "threshold", "key": "probe", "op": ">", "value": 5},
        },
        201,
    )
    old = generate_stream(4, 200, "grad_spike", onset=150)
    old_batches = [(uuid.uuid4().hex, old.records(i, i + 50)) for i in range(0, 200, 50)]
    for batch_id, records in old_batches:
        for r in records:
            r["scalars"]["probe"] = 10.0 if r["step"] == 160 else 0.0
            r["histograms"] = {"h": histogram()}
            r["outliers"] = [{"sample": 0, "position": 1, "x": 1.0, "A": 1.0}]
        api.post(run_id, records, batch_id)
    assert any(e["kind"] == "grad_spike" and e["step"] >= 150 for e in api.events(run_id))
    assert [a["step"] for a in api.events(run_id) if a["type"] == "alert"] == [160]

    answer = api.call("POST", f"/api/v1/runs/{run_id}/rewind", {"step": 100})
    assert answer["removed"]["scalars"] == 99 * len(old.scalars) + 99 and answer["removed"]["histograms"] == 99
    assert answer["removed"]["outliers"] == 99 and answer["removed"]["flags"] >= 1 and answer["removed"]["alerts"] == 1
    assert api.call("POST", f"/api/v1/runs/{run_id}/rewind", {"step": 100})["removed"] == dict.fromkeys(
        answer["removed"], 0
    )
    assert api.call("GET", f"/api/v1/runs/{run_id}")["last_step"] == 100
    assert max(api.series(run_id, "probe")) == 100
    assert api.call("GET", f"/api/v1/runs/{run_id}/histograms/h")["step"][-1] == 100
    assert api.call("GET", f"/api/v1/runs/{run_id}/outliers")["step"] == 100
    events = api.events(run_id)
    assert [e["step"] for e in events if e["type"] == "rewind"] == [100]
    assert not [e for e in events if e["type"] == "flag" and e["step"] > 100]
    assert [a["rewound_at"] is not None for a in events if a["type"] == "alert"] == [True]

    new = generate_stream(4, 200)  # the same run without the grad-norm spike, and another loss
    records = new.records(101, 200)
    for r in records:
        r["scalars"]["probe"] = 10.0 if r["step"] == 160 else 0.0
        r["scalars"]["train/loss"] = math.nan if r["step"] == 180 else r["scalars"]["train/loss"] + 1.0
    assert api.post(run_id, records)["accepted"] == 99 * (len(new.scalars) + 1)
    for batch_id, batch in old_batches:  # the old trajectory's batches, re-sent by a late spool replay
        answer = api.post(run_id, batch, batch_id)
        assert answer["accepted"] == 0
    values = api.series(run_id, "train/loss")
    assert values[50] == old.scalars["train/loss"][50]
    assert values[150] == new.scalars["train/loss"][150] + 1.0
    flags = [e for e in api.events(run_id) if e["type"] == "flag"]
    assert not [f for f in flags if f["kind"] == "grad_spike" and f["step"] > 100]
    assert [f["step"] for f in flags if f["kind"] == "non_finite"] == [180]
    alerts = [(a["step"], a["rewound_at"] is None) for a in api.events(run_id) if a["type"] == "alert"]
    assert sorted(alerts) == [(160, False), (160, True)]  # the old one kept, marked; the new one fired again


def test_rewind_refuses_bad_input(api: Api) -> None:
    run_id = api.new_run()
    api.call("POST", f"/api/v1/runs/{run_id}/rewind", {"step": -2}, 422)
    api.call("POST", f"/api/v1/runs/{run_id}/rewind", {"step": "x"}, 422)
    api.call("POST", f"/api/v1/runs/{uuid.uuid4()}/rewind", {"step": 1}, 404)
    assert api.call("POST", f"/api/v1/runs/{run_id}/rewind", {"step": -1})["removed"]["scalars"] == 0
    assert api.events(run_id) == []  # nothing to rewind: no event


def test_every_rewind_that_removes_something_keeps_its_own_event(api: Api) -> None:
    run_id = api.new_run()
    api.post(run_id, [{"step": s, "scalars": {"x": float(s)}} for s in range(21)])
    api.call("POST", f"/api/v1/runs/{run_id}/rewind", {"step": 10})
    api.post(run_id, [{"step": s, "scalars": {"x": -float(s)}} for s in range(11, 16)])
    api.call("POST", f"/api/v1/runs/{run_id}/rewind", {"step": 10})
    api.call("POST", f"/api/v1/runs/{run_id}/rewind", {"step": 10})  # nothing left to remove: no event
    rewinds = [e for e in api.events(run_id) if e["type"] == "rewind"]
    assert [(e["step"], e["evidence"]["removed"]["scalars"], e["evidence"]["previous_last_step"]) for e in rewinds] == [
        (10, 10, 20),
        (10, 5, 15),
    ]
    assert api.series(run_id, "x") == {s: float(s) for s in range(11)}


def test_fork_shares_history_and_diverges(api: Api) -> None:
    parent = api.new_run("parent")
    api.post(
        parent,
        [
            {"step": s, "scalars": {"x": float(s), "x/nan": math.nan}, "histograms": {"h": histogram()}}
            for s in range(20)
        ],
    )
    child = api.call("POST", f"/api/v1/runs/{parent}/fork", {"step": 9, "name": "child"}, 201)
    assert (child["name"], child["parent_run_id"], child["fork_step"], child["last_step"]) == ("child", parent, 9, 9)
    assert api.call("GET", f"/api/v1/runs/{child['run_id']}")["parent_run_id"] == parent
    kid = child["run_id"]
    assert api.series(kid, "x") == {s: float(s) for s in range(10)}
    assert all(math.isnan(v) for v in api.series(kid, "x/nan").values())
    assert api.call("GET", f"/api/v1/runs/{kid}/histograms/h")["step"] == list(range(10))
    assert api.post(kid, [{"step": s, "scalars": {"x": -float(s)}} for s in range(5, 15)])["accepted"] == 5
    assert api.series(kid, "x") == {**{s: float(s) for s in range(10)}, **{s: -float(s) for s in range(10, 15)}}
    assert api.series(parent, "x") == {s: float(s) for s in range(20)}  # the parent is untouched
    compare = api.call("GET", f"/api/v1/runs/{kid}/scalars?keys=x")["series"]["x"]
    assert compare["step"][:10] == api.call("GET", f"/api/v1/runs/{parent}/scalars?keys=x")["series"]["x"]["step"][:10]
    assert [e["evidence"]["parent_run_id"] for e in api.events(kid) if e["type"] == "fork"] == [parent]
    assert [e["evidence"]["child_run_id"] for e in api.events(parent) if e["type"] == "fork"] == [kid]
    parent_flags = [(e["kind"], e["step"]) for e in api.events(parent) if e["type"] == "flag" and e["step"] <= 9]
    assert [(e["kind"], e["step"]) for e in api.events(kid) if e["type"] == "flag"] == parent_flags
    api.call("POST", f"/api/v1/runs/{parent}/fork", {"step": -1}, 422)
    past = api.call("POST", f"/api/v1/runs/{parent}/fork", {"step": 20}, 422)  # the parent's last step is 19
    assert "past the run's last logged step (19)" in json.dumps(past)
    default = api.call("POST", f"/api/v1/runs/{parent}/fork", {"step": 3}, 201)
    assert default["name"] == "parent-fork-3" and api.series(default["run_id"], "x") == {s: float(s) for s in range(4)}


def test_partial_refusal_keeps_the_good_items(api: Api) -> None:
    run_id = api.new_run()
    api.post(run_id, [{"step": 0, "histograms": {"h": histogram()}}])
    records = [
        {
            "step": 1,
            "scalars": {"train/loss": 0.9, "": 2.0, "bad\x01key": 1.0, "text": "high"},
            "histograms": {"h": histogram(lo=5.0), "inverted": {"lo": 1, "hi": 0, "counts": [1]}, "ok": histogram()},
            "outliers": [{"sample": 0}],
        },
        {"step": 2, "scalars": {"train/loss": 0.8}},
    ]
    answer = api.post(run_id, records)
    assert answer["accepted"] == 3 and answer["duplicates"] == 0
    refused = {(r["step"], r["field"], r["key"]) for r in answer["rejected"]}
    assert refused == {
        (1, "scalars", ""),
        (1, "scalars", "bad\x01key"),
        (1, "scalars", "text"),
        (1, "histograms", "h"),
        (1, "histograms", "inverted"),
        (1, "outliers", None),
    }
    assert all(r["reason"] for r in answer["rejected"])
    assert "binning" in next(r["reason"] for r in answer["rejected"] if r["key"] == "h")
    assert api.series(run_id, "train/loss") == {1: 0.9, 2: 0.8}
    assert api.call("GET", f"/api/v1/runs/{run_id}/keys") == {"scalars": ["train/loss"], "histograms": ["h", "ok"]}
    # Errors of the envelope or of a record itself still refuse the whole batch, storing nothing.
    for bad in ({"step": -1, "scalars": {"a": 1.0}}, {"step": 3, "scalars": [1.0]}, {"step": 3, "typo": {}}):
        api.call(
            "POST",
            f"/api/v1/runs/{run_id}/records",
            {"batch_id": uuid.uuid4().hex, "records": [{"step": 3, "scalars": {"a": 1.0}}, bad]},
            422,
        )
    assert api.series(run_id, "a") == {}


def test_a_rewind_drops_the_flag_listeners_cached_windows(db_url: str) -> None:
    """The listener keeps the newest points of each run in memory; after a rewind they are not the newest."""
    mhpo_migrations.upgrade(db_url)
    with TestClient(create_app(Settings(db=db_url, dashboard=False))) as client:
        run_id = client.post("/api/v1/runs", json={"project": "p", "name": "cache"}).json()["run_id"]
        body = {"batch_id": "b1", "records": generate_stream(1, 60).records(0, 60)}
        assert (
            client.post(
                f"/api/v1/runs/{run_id}/records", content=json.dumps(body), headers={"content-type": "application/json"}
            ).status_code
            == 200
        )
        cache = client.app.state.flag_monitor.cache  # type: ignore[attr-defined]
        assert cache.get(run_id) is not None
        assert client.post(f"/api/v1/runs/{run_id}/rewind", json={"step": 30}).status_code == 200
        assert cache.get(run_id) is None
