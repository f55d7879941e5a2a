"""`GET /api/v1/runs/{id}/events?after=<cursor>` against a real `mhpo serve`, on SQLite and PostgreSQL:
only the events the reader does not hold, flags and fired alerts alike."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mhpo_server.store import Store, open_store
from tests.conftest import strict_loads
from tests.fixtures.server import LiveServer


@pytest.fixture
def http(live_server_db: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server_db.url, timeout=30.0) as client:
        yield client


@pytest.fixture
def store(live_server_db: LiveServer) -> Iterator[Store]:
    """The server's database opened in the test too, to write events as other writers would."""
    opened = open_store(live_server_db.db_url)
    yield opened
    opened.close()


def events(http: httpx.Client, run_id: str, after: str | None = None) -> dict[str, Any]:
    params = {} if after is None else {"after": after}
    response = http.get(f"/api/v1/runs/{run_id}/events", params=params)
    assert response.status_code == 200, response.text
    return strict_loads(response.text)


def post(http: httpx.Client, run_id: str, steps: range, probe: dict[int, float], nan_at: int | None = None) -> None:
    records = [
        {"step": s, "scalars": {"probe": probe.get(s, 0.0), "train/loss": math.nan if s == nan_at else 1.0}}
        for s in steps
    ]
    body = json.dumps({"batch_id": uuid.uuid4().hex, "records": records})  # NaN as the bare token clients send
    response = http.post(f"/api/v1/runs/{run_id}/records", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def flag(step: int, kind: str = "collapse", created_at: float | None = None) -> dict[str, Any]:
    found = {"step": step, "kind": kind, "severity": "warning", "detector": kind, "message": "m", "evidence": None}
    return found if created_at is None else {**found, "created_at": created_at}


def ids(answer: dict[str, Any]) -> list[tuple[str, int]]:
    return sorted((e["type"], e["id"]) for e in answer["events"])


def test_a_cursor_returns_only_newer_flags_alerts_and_the_rewind(http: httpx.Client, store: Store) -> None:
    run_id = http.post("/api/v1/runs", json={"project": "p", "name": "live"}).json()["run_id"]
    rule = {
        "name": "probe high",
        "project": "p",
        "cooldown_s": 0,
        "condition": {"type": "threshold", "key": "probe", "op": ">", "value": 5},
    }
    assert http.post("/api/v1/alert-rules", json=rule).status_code == 201
    post(http, run_id, range(5), {3: 9.0}, nan_at=2)

    full = events(http, run_id)
    assert set(full) == {"events"}  # without `after`: the answer as before
    assert {e["type"] for e in full["events"]} == {"flag", "alert"}
    first = events(http, run_id, after="")
    assert ids(first) == ids(full) and first["cursor"].startswith("flag:")
    assert events(http, run_id, after=first["cursor"])["events"] == []

    post(http, run_id, range(5, 8), {6: 9.0})
    store.add_events(run_id, [flag(7)])
    second = events(http, run_id, after=first["cursor"])
    assert [(e["type"], e["step"]) for e in second["events"]] == [("alert", 6), ("flag", 7)]
    assert not set(ids(second)) & set(ids(first))
    third = events(http, run_id, after=second["cursor"])
    assert third["events"] == [] and third["cursor"] == second["cursor"]

    assert http.post(f"/api/v1/runs/{run_id}/rewind", json={"step": 4}).status_code == 200
    rewound = events(http, run_id, after=third["cursor"])  # flags deleted, an alert marked: the whole list again
    assert rewound["reset"] is True and ids(rewound) == ids(events(http, run_id))
    assert [e["step"] for e in rewound["events"] if e["type"] == "rewind"] == [4]
    assert [(e["step"], e["rewound_at"] is not None) for e in rewound["events"] if e["type"] == "alert"] == [
        (3, False),
        (6, True),
    ]
    quiet = events(http, run_id, after=rewound["cursor"])
    assert quiet["events"] == [] and "reset" not in quiet
    store.add_events(run_id, [flag(7, "relogged")])  # on SQLite it may take the id of a deleted flag
    relogged = events(http, run_id, after=quiet["cursor"])
    assert [e["kind"] for e in relogged["events"]] == ["relogged"] and "reset" not in relogged


def test_a_row_committed_after_a_larger_id_still_comes_back_once(http: httpx.Client, store: Store) -> None:
    run_id = http.post("/api/v1/runs", json={"project": "p", "name": "late"}).json()["run_id"]
    store.add_events(run_id, [flag(1, "late"), flag(2, "early")])
    late, early = sorted(e.id for e in store.list_events(run_id))
    # A reader that read while the row with the smaller id was not committed yet holds only the larger one.
    seen_then = f"flag:{early}.{early}"
    caught = events(http, run_id, after=seen_then)
    assert [e["id"] for e in caught["events"]] == [late]
    assert events(http, run_id, after=caught["cursor"])["events"] == []

    store.add_events(run_id, [flag(0, "imported", created_at=1_000.0)])  # an import keeps its old time
    imported = events(http, run_id, after=caught["cursor"])
    assert [e["kind"] for e in imported["events"]] == ["imported"]
    assert events(http, run_id, after=imported["cursor"])["events"] == []


def test_a_bad_cursor_is_refused_naming_the_parameter(http: httpx.Client) -> None:
    run_id = http.post("/api/v1/runs", json={"project": "p", "name": "bad"}).json()["run_id"]
    response = http.get(f"/api/v1/runs/{run_id}/events", params={"after": "flag:x"})
    assert response.status_code == 422
    assert "after" in response.text and "cursor" in response.text
