"""Flags and alert rules through the API of an in-process app, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

import mhpo_migrations
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from tests.flags.synthetic import generate_stream


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    mhpo_migrations.upgrade(db_url)
    with TestClient(create_app(Settings(db=db_url))) as c:
        yield c


def new_run(client: TestClient, project: str = "p") -> str:
    r = client.post("/api/v1/runs", json={"project": project, "name": f"run-{uuid.uuid4().hex[:6]}"})
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


def post(client: TestClient, run_id: str, records: list[dict[str, Any]], batch_id: str | None = None) -> dict[str, Any]:
    body = json.dumps({"batch_id": batch_id or uuid.uuid4().hex, "records": records})  # NaN/Infinity tokens (C1)
    r = client.post(f"/api/v1/runs/{run_id}/records", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def scalar_records(key: str, values: list[float], start: int = 0) -> list[dict[str, Any]]:
    return [{"step": start + i, "time": 1.7e9 + i, "scalars": {key: v}} for i, v in enumerate(values)]


def events(client: TestClient, run_id: str, type_: str | None = None) -> list[dict[str, Any]]:
    found = client.get(f"/api/v1/runs/{run_id}/events").json()["events"]
    return [e for e in found if type_ is None or e["type"] == type_]


def add_rule(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/api/v1/alert-rules", json={"name": "rule", "project": "p", **body})
    assert r.status_code == 201, r.text
    return r.json()


def test_flags_are_served_as_events_and_resent_records_never_duplicate_them(client: TestClient) -> None:
    run_id = new_run(client)
    stream = generate_stream(4, 300, "grad_spike", onset=150)
    stream.scalars["train/loss"][200] = math.nan
    batches = [(uuid.uuid4().hex, stream.records(i, i + 40)) for i in range(0, 300, 40)]
    for batch_id, records in batches:
        post(client, run_id, records, batch_id)
    first = events(client, run_id, "flag")
    kinds = {(e["kind"], e["step"]) for e in first}
    assert ("grad_spike", 150) in kinds and ("non_finite", 200) in kinds
    nf = next(e for e in first if e["kind"] == "non_finite")
    assert nf["severity"] == "critical" and nf["evidence"]["values"]["train/loss"] == "NaN"
    gs = next(e for e in first if e["kind"] == "grad_spike")
    assert {"key", "value", "baseline", "threshold", "z"} <= set(gs["evidence"]["signals"][0])
    for batch_id, records in batches[3:5]:
        assert post(client, run_id, records, batch_id)["accepted"] == 0
        assert post(client, run_id, records)["accepted"] == 0
    assert events(client, run_id, "flag") == first


def test_alert_rule_crud(client: TestClient) -> None:
    rule = add_rule(client, condition={"type": "threshold", "key": "grad/norm", "op": ">", "value": 10})
    assert rule["enabled"] and rule["channels"] == ["dashboard"] and rule["condition"]["for_steps"] == 1
    assert client.get(f"/api/v1/alert-rules/{rule['id']}").json() == rule
    assert [r["id"] for r in client.get("/api/v1/alert-rules", params={"project": "p"}).json()["rules"]] == [rule["id"]]
    assert client.get("/api/v1/alert-rules", params={"project": "other"}).json()["rules"] == []
    patched = client.patch(f"/api/v1/alert-rules/{rule['id']}", json={"enabled": False, "cooldown_s": 5}).json()
    assert patched["enabled"] is False and patched["cooldown_s"] == 5 and patched["name"] == "rule"
    bad = client.patch(f"/api/v1/alert-rules/{rule['id']}", json={"channels": ["webhook"]})
    assert bad.status_code == 422 and "webhook_url" in bad.text
    assert client.delete(f"/api/v1/alert-rules/{rule['id']}").status_code == 204
    assert client.get(f"/api/v1/alert-rules/{rule['id']}").status_code == 404
    assert client.delete(f"/api/v1/alert-rules/{rule['id']}").status_code == 404


BAD_RULES = [
    ({"condition": {"type": "threshold", "key": "k", "op": "~", "value": 1}}, "op"),
    ({"condition": {"type": "flag", "kind": "meltdown"}}, "kind"),
    ({"condition": {"type": "flag"}, "channels": ["webhook"]}, "webhook_url"),
    ({"condition": {"type": "flag"}, "cooldown_s": -1}, "cooldown_s"),
    ({"condition": {"type": "spike", "key": "k", "z": 0}}, "z"),
]


def test_bad_rules_get_a_422_naming_the_field(sqlite_url: str) -> None:
    mhpo_migrations.upgrade(sqlite_url)
    with TestClient(create_app(Settings(db=sqlite_url))) as client:
        for body, field in BAD_RULES:
            r = client.post("/api/v1/alert-rules", json={"name": "bad", "project": "p", **body})
            assert r.status_code == 422 and field in r.text, (body, r.text)
        assert client.get("/api/v1/alert-rules").json()["rules"] == []


def test_threshold_rule_with_cooldown_fires_once(client: TestClient) -> None:
    run_id = new_run(client)
    once = add_rule(
        client,
        name="once",
        run_id=run_id,
        cooldown_s=3600,
        condition={"type": "threshold", "key": "loss", "op": ">", "value": 1.0},
    )
    every = add_rule(
        client,
        name="every",
        run_id=run_id,
        cooldown_s=0,
        condition={"type": "threshold", "key": "loss", "op": ">", "value": 1.0},
    )
    values = [0.5, 2.0, 0.5, 2.0, 2.0, 0.5, 3.0]
    post(client, run_id, scalar_records("loss", values[:4]))
    post(client, run_id, scalar_records("loss", values[4:], start=4))
    alerts = client.get("/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]
    by_rule = {r: sorted(a["step"] for a in alerts if a["rule_id"] == r) for r in (once["id"], every["id"])}
    assert by_rule[once["id"]] == [1]
    assert by_rule[every["id"]] == [1, 3, 6], "edge-triggered: fires when the condition becomes true"


def test_consecutive_steps_and_disabled_rules(client: TestClient) -> None:
    run_id = new_run(client)
    add_rule(
        client,
        name="3 in a row",
        run_id=run_id,
        cooldown_s=0,
        condition={"type": "threshold", "key": "kl", "op": ">=", "value": 0.1, "for_steps": 3},
    )
    off = add_rule(
        client,
        name="off",
        run_id=run_id,
        cooldown_s=0,
        enabled=False,
        condition={"type": "threshold", "key": "kl", "op": ">=", "value": 0.1},
    )
    post(client, run_id, scalar_records("kl", [0.2, 0.2, 0.0, 0.2, 0.2, 0.2, 0.2, math.nan]))
    alerts = client.get("/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]
    assert [(a["rule_name"], a["step"]) for a in alerts] == [("3 in a row", 5)]
    assert all(a["rule_id"] != off["id"] for a in alerts)


def test_spike_rule_on_any_scalar(client: TestClient) -> None:
    run_id = new_run(client)
    add_rule(
        client,
        name="reward drop",
        run_id=run_id,
        cooldown_s=0,
        condition={"type": "spike", "key": "reward/mean", "direction": "down", "z": 6, "window_steps": 30},
    )
    values = [0.5 + 0.01 * ((i * 7) % 5 - 2) for i in range(60)]
    values[45] = 0.1
    post(client, run_id, scalar_records("reward/mean", values))
    alerts = client.get("/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]
    assert [a["step"] for a in alerts] == [45]
    assert float(alerts[0]["evidence"]["z"]) < -6


def test_flag_rule_scope_ack_and_alerts_in_the_event_list(client: TestClient) -> None:
    run_id, other_run = new_run(client), new_run(client)
    everywhere = add_rule(client, name="grad", condition={"type": "flag", "kind": "grad_spike"})
    elsewhere = add_rule(client, name="other run only", run_id=other_run, condition={"type": "flag", "kind": "*"})
    add_rule(client, name="other project", project="q", condition={"type": "flag", "kind": "*"})
    stream = generate_stream(4, 200, "grad_spike", onset=150)
    post(client, run_id, stream.records())
    alerts = client.get("/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]
    assert [(a["rule_id"], a["step"]) for a in alerts] == [(everywhere["id"], 150)]
    assert elsewhere["id"] not in {a["rule_id"] for a in alerts}
    alert = alerts[0]
    assert alert["delivery_status"] == "none" and alert["acknowledged_at"] is None
    assert alert["evidence"]["flag"]["kind"] == "grad_spike"
    listed = events(client, run_id, "alert")
    assert [(e["id"], e["step"], e["severity"]) for e in listed] == [(alert["id"], 150, "warning")]
    acked = client.post(f"/api/v1/alerts/{alert['id']}/ack").json()
    assert acked["acknowledged_at"] is not None
    assert client.post(f"/api/v1/alerts/{alert['id']}/ack").json()["acknowledged_at"] == acked["acknowledged_at"]
    assert client.get("/api/v1/alerts", params={"acknowledged": False, "run_id": run_id}).json()["alerts"] == []
    assert client.post("/api/v1/alerts/999999/ack").status_code == 404


def test_project_flag_params_override_the_defaults(client: TestClient) -> None:
    r = client.put("/api/v1/projects/quiet/flag-params", json={"grad_spike": {"enabled": False}})
    assert r.status_code == 200 and r.json()["params"]["grad_spike"]["enabled"] is False
    assert r.json()["params"]["hazard_spike"]["enabled"] is True
    bad = client.put("/api/v1/projects/quiet/flag-params", json={"grad_spike": {"threshold": 3}})
    assert bad.status_code == 422 and "threshold" in bad.text
    stream = generate_stream(4, 200, "grad_spike", onset=150)
    quiet, loud = new_run(client, "quiet"), new_run(client, "loud")
    post(client, quiet, stream.records())
    post(client, loud, stream.records())
    assert not [e for e in events(client, quiet, "flag") if e["kind"] == "grad_spike"]
    assert [e["step"] for e in events(client, loud, "flag") if e["kind"] == "grad_spike"] == [150]
    got = client.get("/api/v1/projects/quiet/flag-params").json()
    assert got["overrides"] == {"grad_spike": {"enabled": False}}
