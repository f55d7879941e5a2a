"""A failing ingest listener is visible (healthz, metrics, a run event) while ingest keeps answering 200."""

from __future__ import annotations

import httpx
from sqlalchemy import create_engine, text

from tests.fixtures.server import LiveServer


def post_records(server: LiveServer, run_id: str, batch: str, steps: range) -> httpx.Response:
    records = [{"step": s, "scalars": {"grad/norm": 1.0}} for s in steps]
    return httpx.post(f"{server.url}/api/v1/runs/{run_id}/records", json={"batch_id": batch, "records": records})


def test_failing_listener_is_reported(live_server_db: LiveServer) -> None:
    server = live_server_db
    healthy = httpx.post(f"{server.url}/api/v1/runs", json={"project": "p", "name": "r"}).json()["run_id"]
    assert post_records(server, healthy, "ok", range(5)).status_code == 200
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    # A project whose alert rules the listener has not read (and cached) yet.
    run_id = httpx.post(f"{server.url}/api/v1/runs", json={"project": "q", "name": "r"}).json()["run_id"]

    engine = create_engine(server.db_url)  # break the alert rules table under the running server
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE alert_rules RENAME TO alert_rules_away"))
        stored = post_records(server, run_id, "broken", range(5))
        assert stored.json() == {"accepted": 5, "duplicates": 0, "rejected": []}  # the batch itself is stored

        state = httpx.get(f"{server.url}/healthz").json()
        failure = state["ingest_listeners"]["IngestMonitor"]
        assert state["status"] == "degraded" and failure["ok"] is False and failure["failures"] == 1
        assert failure["last_failure"]["run_id"] == run_id and failure["last_failure"]["step"] == 0
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'mhpo_ingest_listener_errors_total{listener="IngestMonitor"} 1.0' in metrics
        events = httpx.get(f"{server.url}/api/v1/runs/{run_id}/events").json()["events"]
        reported = [e for e in events if e["kind"] == "listener_error"]
        assert [(e["step"], e["severity"], e["detector"]) for e in reported] == [(0, "warning", "IngestMonitor")]
        assert httpx.get(f"{server.url}/api/v1/runs/{run_id}").json()["open_flags"] >= 1

        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE alert_rules_away RENAME TO alert_rules"))
    finally:
        engine.dispose()
    assert post_records(server, run_id, "again", range(5, 10)).status_code == 200
    assert httpx.get(f"{server.url}/healthz").json()["ingest_listeners"]["IngestMonitor"]["ok"] is True
