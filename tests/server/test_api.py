"""The HTTP API over a real app and database: contract C1/C7 shapes, 4xx naming the field, limits, auth."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.routes.events import EventSource
from mhpo_server.schemas import RecordIn
from mhpo_server.store import Store, open_store
from tests.conftest import strict_loads
from tests.server.conftest import new_run, post_json

HIST = {
    "lo": -2.0,
    "hi": 2.0,
    "counts": [0, 3, 1, 0],
    "underflow": 0,
    "overflow": 1,
    "min": -1.0,
    "max": 2.5,
    "sum": 1.0,
    "sumsq": 8.0,
}


def batch(*records: dict[str, Any], batch_id: str | None = None) -> dict[str, Any]:
    return {"batch_id": batch_id or str(uuid.uuid4()), "records": list(records)}


def test_records_round_trip_with_nonfinite_tokens(client: TestClient) -> None:
    run_id = new_run(client, config={"lr": 1e-6}, loss="mhpo")
    body = batch(
        {
            "step": 0,
            "time": 1.7e9,
            "scalars": {"a": math.nan, "b": math.inf, "c": -math.inf},
            "histograms": {"log_ratio": HIST},
            "outliers": [{"sample": 0, "position": 1, "token_id": 2, "text": "x", "x": 1.0, "A": 1.0, "zeta": None}],
        }
    )
    response = post_json(client, f"/api/v1/runs/{run_id}/records", body)
    assert response.status_code == 200 and response.json() == {"accepted": 5, "duplicates": 0, "rejected": []}
    again = post_json(client, f"/api/v1/runs/{run_id}/records", body)
    assert again.json() == {"accepted": 0, "duplicates": 5, "rejected": []}
    raw = client.get(f"/api/v1/runs/{run_id}/scalars", params={"keys": "a,b,c"}).text
    assert '"value":["NaN"]' in raw and '"value":["Infinity"]' in raw and '"value":["-Infinity"]' in raw
    scalars = strict_loads(raw)
    assert scalars["downsampled"] is False and set(scalars["series"]) == {"a", "b", "c"}
    assert client.get(f"/api/v1/runs/{run_id}/histograms/log_ratio").json()["counts"] == [[0, 3, 1, 0]]
    assert client.get(f"/api/v1/runs/{run_id}/outliers", params={"step": 0}).json()["outliers"][0]["text"] == "x"
    assert client.get(f"/api/v1/runs/{run_id}/keys").json() == {"scalars": ["a", "b", "c"], "histograms": ["log_ratio"]}
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["last_step"] == 0 and run["config"] == {"lr": 1e-6}
    events = client.get(f"/api/v1/runs/{run_id}/events").json()["events"]
    assert run["open_flags"] == sum(e["type"] == "flag" and e["severity"] != "info" for e in events)
    assert set(run) == {
        "run_id",
        "project",
        "name",
        "loss",
        "config",
        "status",
        "created_at",
        "updated_at",
        "last_step",
        "last_seen_at",
        "open_flags",
        "parent_run_id",
        "fork_step",
    }
    assert client.get("/api/v1/runs", params={"project": "p"}).json()["runs"][0]["run_id"] == run_id
    assert client.get("/api/v1/runs", params={"project": "nope"}).json() == {"runs": []}
    projects = client.get("/api/v1/projects").json()["projects"]
    assert [(p["name"], p["runs"]) for p in projects] == [("p", 1)]


def test_run_lifecycle_and_client_run_id(client: TestClient) -> None:
    rid = str(uuid.uuid4())
    assert new_run(client, run_id=rid) == rid
    assert new_run(client, run_id=rid) == rid, "re-posting the same run is idempotent"
    clash = post_json(client, "/api/v1/runs", {"project": "other", "name": "r", "run_id": rid})
    assert clash.status_code == 409 and rid in clash.json()["detail"]
    patched = client.patch(f"/api/v1/runs/{rid}", json={"status": "finished"})
    assert patched.status_code == 200 and patched.json()["status"] == "finished"
    assert client.patch(f"/api/v1/runs/{rid}", json={"status": "done"}).status_code == 422
    assert client.patch(f"/api/v1/runs/{uuid.uuid4()}", json={"status": "failed"}).status_code == 404


BAD_RECORDS = [
    ({"step": -1}, "step"),
    ({"step": 2**60}, "step"),
    ({"step": "one"}, "step"),
    ({"step": 0, "time": math.nan}, "time"),
    ({"step": 0, "scalars": [1.0]}, "scalars"),
    ({"step": 0, "histograms": {"h": [1]}, "outliers": {}}, "outliers"),
    ({"step": 0, "scalarz": {}}, "scalarz"),
]
BAD_ITEMS = [  # (record, field, key, a word of the reason): refused alone, the rest is stored
    ({"step": 0, "scalars": {"a": "x", "ok": 1.0}}, "scalars", "a", "number"),
    ({"step": 0, "scalars": {"": 1.0, "ok": 1.0}}, "scalars", "", "key"),
    ({"step": 0, "scalars": {"a\x01": 1.0, "ok": 1.0}}, "scalars", "a\x01", "key"),
    ({"step": 0, "histograms": {"h": {**HIST, "lo": 2.0, "hi": 2.0}}, "scalars": {"ok": 1.0}}, "histograms", "h", "lo"),
    ({"step": 0, "histograms": {"h": {**HIST, "lo": math.nan}}, "scalars": {"ok": 1.0}}, "histograms", "h", "lo"),
    ({"step": 0, "histograms": {"h": {**HIST, "hi": math.inf}}, "scalars": {"ok": 1.0}}, "histograms", "h", "hi"),
    (
        {"step": 0, "histograms": {"h": {**HIST, "counts": [1, -1]}}, "scalars": {"ok": 1.0}},
        "histograms",
        "h",
        "counts",
    ),
    ({"step": 0, "histograms": {"h": {**HIST, "counts": []}}, "scalars": {"ok": 1.0}}, "histograms", "h", "counts"),
    (
        {"step": 0, "outliers": [{"sample": 0, "position": -2, "x": 0.0, "A": 0.0}], "scalars": {"ok": 1.0}},
        "outliers",
        None,
        "position",
    ),
]


@pytest.mark.parametrize(("record", "field"), BAD_RECORDS, ids=[f for _, f in BAD_RECORDS])
def test_bad_records_get_422_naming_the_field(client: TestClient, record: dict[str, Any], field: str) -> None:
    run_id = new_run(client)
    good = {"step": 1, "scalars": {"kept": 1.0}}
    response = post_json(client, f"/api/v1/runs/{run_id}/records", batch(good, record))
    assert response.status_code == 422, response.text
    assert any(field in map(str, error["loc"]) for error in response.json()["detail"]), response.text
    assert client.get(f"/api/v1/runs/{run_id}/keys").json()["scalars"] == [], "no partial write"


@pytest.mark.parametrize(("record", "field", "key", "word"), BAD_ITEMS, ids=[f"{f}-{w}" for _, f, _, w in BAD_ITEMS])
def test_bad_items_are_refused_alone(
    client: TestClient, record: dict[str, Any], field: str, key: str | None, word: str
) -> None:
    run_id = new_run(client)
    response = post_json(client, f"/api/v1/runs/{run_id}/records", batch({"step": 1, "scalars": {"kept": 1.0}}, record))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["accepted"], answer["duplicates"]) == (2, 0)
    [refused] = answer["rejected"]
    assert (refused["step"], refused["field"], refused["key"]) == (0, field, key) and word in refused["reason"]
    assert client.get(f"/api/v1/runs/{run_id}/keys").json() == {"scalars": ["kept", "ok"], "histograms": []}


def test_other_bad_requests_are_4xx(client: TestClient) -> None:
    run_id = new_run(client)
    unknown = post_json(client, f"/api/v1/runs/{uuid.uuid4()}/records", batch({"step": 0}))
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["detail"]
    assert client.get("/api/v1/runs/not-a-uuid").status_code == 422
    assert (
        client.post(
            f"/api/v1/runs/{run_id}/records", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    missing = post_json(client, f"/api/v1/runs/{run_id}/records", {"records": []})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "batch_id"]
    assert client.get(f"/api/v1/runs/{run_id}/scalars", params={"max_points": 1}).status_code == 422
    assert client.get(f"/api/v1/runs/{run_id}/scalars", params={"max_points": 10**6}).status_code == 422
    reversed_range = client.get(f"/api/v1/runs/{run_id}/scalars", params={"start": 5, "end": 1})
    assert reversed_range.status_code == 422 and reversed_range.json()["detail"][0]["loc"] == ["query", "start"]
    assert post_json(client, "/api/v1/runs", {"project": "p"}).status_code == 422
    too_many = client.get(f"/api/v1/runs/{run_id}/scalars", params={"keys": ",".join(f"k{i}" for i in range(1001))})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["query", "keys"]
    assert client.get(f"/api/v1/runs/{run_id}/scalars", params={"keys": "a\x01"}).status_code == 422
    assert client.get("/api/v1/runs", params={"project": "\x00"}).status_code == 422
    binning = [
        batch({"step": 0, "histograms": {"h": HIST}}),
        batch({"step": 1, "histograms": {"h": {**HIST, "hi": 3.0}}}),
    ]
    assert post_json(client, f"/api/v1/runs/{run_id}/records", binning[0]).status_code == 200
    changed = post_json(client, f"/api/v1/runs/{run_id}/records", binning[1])
    assert changed.status_code == 200 and changed.json()["accepted"] == 0
    assert [(r["step"], r["key"]) for r in changed.json()["rejected"]] == [(1, "h")]
    assert "binning" in changed.json()["rejected"][0]["reason"]


@pytest.fixture
def small_app(migrated_url: str) -> FastAPI:
    return create_app(Settings(db=migrated_url, dashboard=False, max_body_bytes=4096, max_records_per_batch=10))


def test_body_size_and_batch_limits(small_app: FastAPI) -> None:
    with TestClient(small_app) as client:
        run_id = new_run(client)
        url = f"/api/v1/runs/{run_id}/records"
        big = batch(*({"step": s, "scalars": {f"k{i}": 1.0 for i in range(200)}} for s in range(5)))
        declared = post_json(client, url, big)
        assert declared.status_code == 413 and "4096 bytes" in declared.json()["detail"]
        payload = json.dumps(big).encode()

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(payload), 1000):
                yield payload[i : i + 1000]

        streamed = client.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        many = post_json(client, url, batch(*({"step": s} for s in range(11))))
        assert many.status_code == 422 and many.json()["detail"][0]["loc"] == ["body", "records"]
        assert post_json(client, url, batch(*({"step": s} for s in range(10)))).status_code == 200


def test_auth_scopes_and_projects(migrated_url: str) -> None:
    store = open_store(migrated_url)
    write, read = store.create_token("p", "write"), store.create_token("p", "read")
    other = store.create_token("q", "write")
    store.close()

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    with TestClient(create_app(Settings(db=migrated_url, dashboard=False, auth=True))) as client:
        body = {"project": "p", "name": "r"}
        assert client.post("/api/v1/runs", json=body).status_code == 401
        assert client.post("/api/v1/runs", json=body, headers=bearer("nope")).status_code == 401
        assert client.post("/api/v1/runs", json=body, headers=bearer(read)).status_code == 403
        assert client.post("/api/v1/runs", json=body, headers=bearer(other)).status_code == 403
        created = client.post("/api/v1/runs", json=body, headers=bearer(write))
        assert created.status_code == 201
        run_id = created.json()["run_id"]
        records = batch({"step": 0, "scalars": {"a": 1.0}})
        assert post_json(client, f"/api/v1/runs/{run_id}/records", records, headers=bearer(read)).status_code == 403
        # another project's run answers as an unknown one would: 404, not a 403 that proves it exists
        assert post_json(client, f"/api/v1/runs/{run_id}/records", records, headers=bearer(other)).status_code == 404
        assert post_json(client, f"/api/v1/runs/{run_id}/records", records, headers=bearer(write)).status_code == 200
        assert client.get(f"/api/v1/runs/{run_id}/scalars").status_code == 401
        assert client.get(f"/api/v1/runs/{run_id}/scalars", headers=bearer(read)).status_code == 200
        assert client.get(f"/api/v1/runs/{run_id}", headers=bearer(other)).status_code == 404
        assert client.get("/api/v1/runs", headers=bearer(other)).json() == {"runs": []}
        assert client.get("/api/v1/projects", headers=bearer(read)).json()["projects"][0]["name"] == "p"
        assert client.get("/healthz").status_code == 200


def test_ingest_listeners_get_only_new_records(app: FastAPI) -> None:
    seen: list[tuple[str, list[RecordIn]]] = []

    def listener(store: Store, run_id: str, records: list[RecordIn]) -> None:
        seen.append((run_id, records))

    def broken(store: Store, run_id: str, records: list[RecordIn]) -> None:
        raise RuntimeError("detector bug")

    app.state.ingest.listeners.extend([broken, listener])
    with TestClient(app) as client:
        run_id = new_run(client)
        url = f"/api/v1/runs/{run_id}/records"
        assert post_json(client, url, batch(*({"step": s, "scalars": {"a": 1.0}} for s in range(3)))).status_code == 200
        overlap = batch(*({"step": s, "scalars": {"a": 2.0}} for s in range(2, 5)))
        assert post_json(client, url, overlap).json() == {"accepted": 2, "duplicates": 1, "rejected": []}
        assert post_json(client, url, overlap).json() == {"accepted": 0, "duplicates": 3, "rejected": []}
        metrics = client.get("/metrics").text
    assert [[r.step for r in records] for _, records in seen] == [[0, 1, 2], [3, 4]]
    assert all(isinstance(r, RecordIn) for _, records in seen for r in records) and seen[0][0] == run_id
    assert (
        'mhpo_ingest_listener_errors_total{listener="test_ingest_listeners_get_only_new_records.<locals>.broken"} 2.0'
        in metrics
    )


def test_event_sources_and_flags(app: FastAPI, store: Store) -> None:
    app.state.event_sources.append(
        EventSource("extra", lambda s, run_id, after_id, since: [{"type": "alert", "step": 1, "rule": "r"}])
    )
    with TestClient(app) as client:
        run_id = new_run(client)
        store.add_events(
            run_id,
            [
                {
                    "step": 2,
                    "kind": "collapse",
                    "severity": "critical",
                    "detector": "entropy",
                    "message": "entropy falling",
                    "evidence": {"slope": -math.inf},
                }
            ],
        )
        events = client.get(f"/api/v1/runs/{run_id}/events").json()["events"]
        assert [e["type"] for e in events] == ["alert", "flag"]
        flag = events[1]
        assert set(flag) == {"id", "type", "kind", "step", "severity", "detector", "message", "evidence", "created_at"}
        assert flag["evidence"] == {"slope": "-Infinity"}  # strict JSON: non-finite numbers as strings
        assert client.get(f"/api/v1/runs/{run_id}").json()["open_flags"] == 1


def test_metrics_endpoint(client: TestClient) -> None:
    run_id = new_run(client)
    records = batch({"step": 0, "scalars": {"a": 1.0, "b": 2.0}, "histograms": {"h": HIST}})
    post_json(client, f"/api/v1/runs/{run_id}/records", records, headers={"X-MHPO-Replay": "1"})
    post_json(client, f"/api/v1/runs/{run_id}/records", records)
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'mhpo_http_requests_total{method="POST",route="/api/v1/runs/{run_id}/records",status="200"} 2.0' in text
    assert 'mhpo_http_request_duration_seconds_bucket{le="0.001",method="POST",route="/api/v1/runs"' in text
    assert 'mhpo_rows_written_total{table="scalars"} 2.0' in text
    assert 'mhpo_rows_written_total{table="histograms"} 1.0' in text
    assert 'mhpo_batches_total{result="duplicate"} 1.0' in text
    assert "mhpo_spool_replays_total 1.0" in text
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]
