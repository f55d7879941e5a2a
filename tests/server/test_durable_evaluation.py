"""Flags and alerts survive a crash between a batch's commit and its evaluation, and forks see whole batches.

A batch judged on the process's cached view of its run is stored with its flags in one
transaction: no window. A batch whose run another process wrote meanwhile is evaluated after
its commit. The kill test makes that the common case (two server processes on one database,
each run's requests alternating between them) and kills both with SIGKILL until a kill lands
in the window (the database then holds a run whose stored steps are ahead of its evaluation
position); a restarted server must fire every expected alert once.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from mhpo_server.schemas import RecordIn
from mhpo_server.store import SqlStore, Store
from tests.fixtures.server import LiveServer
from tests.flags.synthetic import generate_stream

KEY = "bench/x"
RUNS = 6


def x_at(step: int) -> float:
    return 1.0 if step % 3 == 0 else 0.0  # the rule fires at every third step


def add_rule(url: str) -> None:
    rule = {
        "name": "x high",
        "project": "p",
        "condition": {"type": "threshold", "key": KEY, "op": ">", "value": 0.5},
        "cooldown_s": 0,
    }
    r = httpx.post(f"{url}/api/v1/alert-rules", json=rule, timeout=30)
    assert r.status_code == 201, r.text


def stream(urls: list[str], run_id: str, start: int, stop: threading.Event) -> None:
    """One step per request, alternating between the servers, until they stop answering."""
    with httpx.Client(timeout=10) as client:
        step = start
        while not stop.is_set():
            body = {"batch_id": uuid.uuid4().hex, "records": [{"step": step, "scalars": {KEY: x_at(step)}}]}
            try:
                client.post(f"{urls[step % 2]}/api/v1/runs/{run_id}/records", json=body)
            except httpx.HTTPError:
                return
            step += 1


def stored_and_alerted(db_url: str, run_id: str) -> tuple[list[int], list[int]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            steps = conn.execute(
                text("SELECT step FROM scalars WHERE run_id = :r AND key = :k ORDER BY step"), {"r": run_id, "k": KEY}
            ).scalars()
            expected = [int(s) for s in steps if x_at(int(s)) > 0.5]
            alerted = conn.execute(
                text("SELECT step FROM alerts WHERE run_id = :r AND rewound_at IS NULL ORDER BY step"), {"r": run_id}
            ).scalars()
            return expected, [int(s) for s in alerted]
    finally:
        engine.dispose()


def runs_behind(db_url: str) -> set[str]:
    store = SqlStore.from_url(db_url)
    try:
        return {run_id for run_id, _, _ in store.behind()}
    finally:
        store.close()


def test_a_server_killed_between_commit_and_evaluation_catches_up_after_restart(db_url: str) -> None:
    server, other = LiveServer(db_url).start(), LiveServer(db_url, migrate=False).start()
    urls = [server.url, other.url]
    try:
        add_rule(server.url)
        runs = [
            httpx.post(f"{server.url}/api/v1/runs", json={"project": "p", "name": f"r{i}"}).json()["run_id"]
            for i in range(RUNS)
        ]
        behind: set[str] = set()
        next_step = dict.fromkeys(runs, 0)
        for _round in range(10):  # until a kill lands between a commit and its evaluation
            stop = threading.Event()
            threads = [threading.Thread(target=stream, args=(urls, r, next_step[r], stop), daemon=True) for r in runs]
            for t in threads:
                t.start()
            time.sleep(1.0)
            server.kill()
            other.kill()
            stop.set()
            for t in threads:
                t.join(30)
            behind = runs_behind(db_url)
            if behind:
                break
            for r in runs:
                done, _ = stored_and_alerted(db_url, r)
                next_step[r] = (max(done) + 3) if done else 0
            server.start()
            other.start()
        assert behind, "no kill landed between a commit and its evaluation in 10 rounds"

        server.start()  # the start evaluates what was committed but not evaluated
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lag = httpx.get(f"{server.url}/healthz").json()["evaluation"]
            if lag["runs_behind"] == 0:
                break
            time.sleep(0.2)
        assert lag == {"runs_behind": 0, "max_steps_behind": 0}
        for r in runs:
            expected, alerted = stored_and_alerted(db_url, r)
            assert alerted == expected, f"run {r}: alerts at {alerted}, expected at {expected}"
    finally:
        server.stop()
        other.stop()


def crash_after_commit(store: Store, run_id: str, batch_id: str, steps: range) -> list[RecordIn]:
    """What a server killed after the commit leaves: the batch stored, its steps not evaluated."""
    records = [RecordIn(step=s, scalars={KEY: x_at(s)}) for s in steps]
    result = store.write_records(run_id, batch_id, records)
    assert result.accepted == len(steps)
    return records


def post(client: TestClient, run_id: str, batch_id: str, steps: range) -> dict[str, Any]:
    body = {"batch_id": batch_id, "records": [{"step": s, "scalars": {KEY: x_at(s)}} for s in steps]}
    response = client.post(f"/api/v1/runs/{run_id}/records", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def alert_steps(client: TestClient, run_id: str) -> list[int]:
    alerts = client.get("/api/v1/alerts", params={"run_id": run_id}).json()["alerts"]
    return sorted(a["step"] for a in alerts)


def test_the_clients_retry_of_a_batch_stored_but_not_evaluated_evaluates_it(app: FastAPI, store: Store) -> None:
    with TestClient(app) as client:
        rule = {"name": "x", "project": "p", "condition": {"type": "threshold", "key": KEY, "op": ">", "value": 0.5}}
        assert client.post("/api/v1/alert-rules", json={**rule, "cooldown_s": 0}).status_code == 201
        run_id = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["run_id"]
        assert post(client, run_id, "a", range(10))["accepted"] == 10
        crash_after_commit(store, run_id, "b", range(10, 20))
        assert client.get("/healthz").json()["evaluation"] == {"runs_behind": 1, "max_steps_behind": 10}
        # The retry is a duplicate: nothing is stored again, but the missed steps are evaluated.
        assert post(client, run_id, "b", range(10, 20)) == {"accepted": 0, "duplicates": 10, "rejected": []}
        assert alert_steps(client, run_id) == [s for s in range(20) if x_at(s) > 0.5]
        assert client.get("/healthz").json()["evaluation"] == {"runs_behind": 0, "max_steps_behind": 0}

        crash_after_commit(store, run_id, "c", range(20, 30))
        assert post(client, run_id, "d", range(30, 35))["accepted"] == 5  # the next batch catches up first
        assert alert_steps(client, run_id) == [s for s in range(35) if x_at(s) > 0.5]
        assert post(client, run_id, "a", range(10))["duplicates"] == 10
        assert alert_steps(client, run_id) == [s for s in range(35) if x_at(s) > 0.5]  # none twice


def test_an_out_of_order_batch_is_judged_with_the_steps_after_it(app: FastAPI) -> None:
    with TestClient(app) as client:
        rule = {"name": "x", "project": "p", "condition": {"type": "threshold", "key": KEY, "op": ">", "value": 0.5}}
        assert client.post("/api/v1/alert-rules", json={**rule, "cooldown_s": 0}).status_code == 201
        run_id = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["run_id"]
        post(client, run_id, "late", range(10, 20))
        post(client, run_id, "early", range(10))
        assert alert_steps(client, run_id) == [s for s in range(20) if x_at(s) > 0.5]
        assert client.get("/healthz").json()["evaluation"]["runs_behind"] == 0


def flags(url: str, run_id: str, through: int) -> list[tuple[Any, ...]]:
    events = httpx.get(f"{url}/api/v1/runs/{run_id}/events", timeout=30).json()["events"]
    return sorted(
        (e["step"], e["kind"], e["severity"], e["message"], json.dumps(e["evidence"], sort_keys=True))
        for e in events
        if e["type"] == "flag" and e["step"] <= through
    )


def test_a_fork_during_ingest_has_every_flag_of_the_history_it_copied(live_server_db: LiveServer) -> None:
    url = live_server_db.url
    history = generate_stream(5, 360, "collapse", onset=200)
    history.scalars["grad/norm"][120] *= 40.0
    run_id = httpx.post(f"{url}/api/v1/runs", json={"project": "p", "name": "parent"}).json()["run_id"]
    done = threading.Event()

    def ingest() -> None:
        with httpx.Client(timeout=60) as client:
            for start in range(0, 360, 6):
                body = {"batch_id": uuid.uuid4().hex, "records": history.records(start, start + 6)}
                assert client.post(f"{url}/api/v1/runs/{run_id}/records", json=body).status_code == 200
        done.set()

    writer = threading.Thread(target=ingest)
    writer.start()
    forks: list[tuple[str, int]] = []
    with httpx.Client(timeout=60) as client:
        while not done.is_set():
            last = client.get(f"{url}/api/v1/runs/{run_id}").json()["last_step"]
            if last is not None:
                r = client.post(f"{url}/api/v1/runs/{run_id}/fork", json={"step": last})
                assert r.status_code == 201, r.text
                forks.append((r.json()["run_id"], last))
            time.sleep(0.05)
    writer.join()
    assert len(forks) >= 5
    for child, step in forks:
        assert flags(url, child, step) == flags(url, run_id, step), f"fork at step {step}"
    assert any(flags(url, child, step) for child, step in forks)


def test_a_rule_without_cooldown_fires_after_an_alert_stamped_later_by_another_process(
    app: FastAPI, store: SqlStore
) -> None:
    """Another server process may store an alert with a `created_at` a moment after this process's clock read."""
    with TestClient(app) as client:
        rule = {"name": "x", "project": "p", "condition": {"type": "threshold", "key": KEY, "op": ">", "value": 0.5}}
        rule_id = client.post("/api/v1/alert-rules", json={**rule, "cooldown_s": 0}).json()["id"]
        run_id = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["run_id"]
        post(client, run_id, "a", range(3))
        later = {"rule_id": rule_id, "rule_name": "x", "project": "p", "run_id": run_id, "severity": "warning"}
        store.alerts.add_alert(
            {
                **later,
                "step": 1,
                "message": "m",
                "evidence": {},
                "created_at": time.time() + 5,
                "delivery_status": "none",
            }
        )
        post(client, run_id, "b", range(3, 7))
        assert alert_steps(client, run_id) == [0, 1, 3, 6]
