"""The auth matrix: every operation of /openapi.json (and /metrics) x every kind of caller.

Callers: auth off; auth on with no token, an unknown token, project A's read and write
tokens, project B's read and write tokens; every request targets project A's resources.
`pytest tests/server/test_auth_matrix.py -s` prints the table of status codes. A new route
fails `test_every_route_is_in_the_matrix` until it is given a request and a rule here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.store import open_store

CALLERS = ("auth off", "no token", "bad token", "read A", "write A", "read B", "write B")
PUBLIC, LIST, READ, WRITE = "public", "list", "read", "write"  # list: any token, filtered to its project
MLFLOW = "/api/2.0/mlflow"
RULE = {
    "name": "hot",
    "project": "A",
    "condition": {"type": "threshold", "key": "a", "op": ">", "value": 0.5},
    "channels": ["dashboard", "webhook"],
    "webhook_url": "https://hooks.example.com/services/SECRET",
}


@dataclass
class World:
    """Project A's resources, created through the API with A's write token."""

    client: TestClient
    tokens: dict[str, str | None]
    run_id: str
    rule_id: int
    alert_id: int

    def as_(self, caller: str) -> dict[str, str]:
        token = self.tokens.get(caller)
        return {} if token is None else {"Authorization": f"Bearer {token}"}

    def new_rule(self) -> int:
        response = self.client.post(
            "/api/v1/alert-rules", json={**RULE, "name": f"r-{uuid.uuid4().hex[:6]}"}, headers=self.as_("write A")
        )
        assert response.status_code == 201, response.text
        return int(response.json()["id"])


Request = Callable[[World], tuple[str, str, dict[str, Any]]]  # -> method, url, httpx keyword arguments

# (method, OpenAPI path) -> (what it needs, how to build one request for project A's resources)
OPERATIONS: dict[tuple[str, str], tuple[str, Request]] = {
    ("GET", "/healthz"): (PUBLIC, lambda w: ("GET", "/healthz", {})),
    ("GET", "/metrics"): (PUBLIC, lambda w: ("GET", "/metrics", {})),
    ("GET", "/api/v1/projects"): (LIST, lambda w: ("GET", "/api/v1/projects", {})),
    ("GET", "/api/v1/auth/whoami"): (LIST, lambda w: ("GET", "/api/v1/auth/whoami", {})),  # any valid token
    ("POST", "/api/v1/runs"): (WRITE, lambda w: ("POST", "/api/v1/runs", {"json": {"project": "A", "name": "new"}})),
    ("GET", "/api/v1/runs"): (READ, lambda w: ("GET", "/api/v1/runs", {"params": {"project": "A"}})),
    ("GET", "/api/v1/runs/{run_id}"): (READ, lambda w: ("GET", f"/api/v1/runs/{w.run_id}", {})),
    ("PATCH", "/api/v1/runs/{run_id}"): (
        WRITE,
        lambda w: ("PATCH", f"/api/v1/runs/{w.run_id}", {"json": {"status": "running"}}),
    ),
    ("POST", "/api/v1/runs/{run_id}/records"): (
        WRITE,
        lambda w: (
            "POST",
            f"/api/v1/runs/{w.run_id}/records",
            {"json": {"batch_id": uuid.uuid4().hex, "records": [{"step": 100, "scalars": {"b": 1.0}}]}},
        ),
    ),
    ("POST", "/api/v1/runs/{run_id}/rewind"): (  # past the last step: keeps the history the other rows read
        WRITE,
        lambda w: ("POST", f"/api/v1/runs/{w.run_id}/rewind", {"json": {"step": 1000}}),
    ),
    ("POST", "/api/v1/runs/{run_id}/fork"): (
        WRITE,
        lambda w: ("POST", f"/api/v1/runs/{w.run_id}/fork", {"json": {"step": 1, "name": "fork"}}),
    ),
    ("GET", "/api/v1/runs/{run_id}/keys"): (READ, lambda w: ("GET", f"/api/v1/runs/{w.run_id}/keys", {})),
    ("GET", "/api/v1/runs/{run_id}/scalars"): (READ, lambda w: ("GET", f"/api/v1/runs/{w.run_id}/scalars", {})),
    ("GET", "/api/v1/runs/{run_id}/histograms/{key}"): (
        READ,
        lambda w: ("GET", f"/api/v1/runs/{w.run_id}/histograms/h", {}),
    ),
    ("GET", "/api/v1/runs/{run_id}/outliers"): (READ, lambda w: ("GET", f"/api/v1/runs/{w.run_id}/outliers", {})),
    ("GET", "/api/v1/runs/{run_id}/events"): (READ, lambda w: ("GET", f"/api/v1/runs/{w.run_id}/events", {})),
    ("GET", "/api/v1/runs/{run_id}/forecast"): (READ, lambda w: ("GET", f"/api/v1/runs/{w.run_id}/forecast", {})),
    ("GET", "/api/v1/flag-kinds"): (LIST, lambda w: ("GET", "/api/v1/flag-kinds", {})),  # any valid token
    ("POST", "/api/v1/alert-rules"): (WRITE, lambda w: ("POST", "/api/v1/alert-rules", {"json": RULE})),
    ("GET", "/api/v1/alert-rules"): (READ, lambda w: ("GET", "/api/v1/alert-rules", {"params": {"project": "A"}})),
    ("GET", "/api/v1/alert-rules/{rule_id}"): (READ, lambda w: ("GET", f"/api/v1/alert-rules/{w.rule_id}", {})),
    ("PATCH", "/api/v1/alert-rules/{rule_id}"): (
        WRITE,
        lambda w: ("PATCH", f"/api/v1/alert-rules/{w.rule_id}", {"json": {"cooldown_s": 60}}),
    ),
    ("DELETE", "/api/v1/alert-rules/{rule_id}"): (
        WRITE,
        lambda w: ("DELETE", f"/api/v1/alert-rules/{w.new_rule()}", {}),
    ),
    ("GET", "/api/v1/alerts"): (READ, lambda w: ("GET", "/api/v1/alerts", {"params": {"project": "A"}})),
    ("GET", "/api/v1/alerts/{alert_id}"): (READ, lambda w: ("GET", f"/api/v1/alerts/{w.alert_id}", {})),
    ("POST", "/api/v1/alerts/{alert_id}/ack"): (WRITE, lambda w: ("POST", f"/api/v1/alerts/{w.alert_id}/ack", {})),
    ("GET", "/api/v1/projects/{project}/flag-params"): (READ, lambda w: ("GET", "/api/v1/projects/A/flag-params", {})),
    ("PUT", "/api/v1/projects/{project}/flag-params"): (
        WRITE,
        lambda w: ("PUT", "/api/v1/projects/A/flag-params", {"json": {}}),
    ),
    # MLflow's tracking API: an experiment is a project, so A's experiment and A's run.
    ("GET", f"{MLFLOW}/experiments/get-by-name"): (
        READ,
        lambda w: ("GET", f"{MLFLOW}/experiments/get-by-name", {"params": {"experiment_name": "A"}}),
    ),
    ("GET", f"{MLFLOW}/experiments/get"): (
        READ,
        lambda w: ("GET", f"{MLFLOW}/experiments/get", {"params": {"experiment_id": "A"}}),
    ),
    ("POST", f"{MLFLOW}/experiments/create"): (
        WRITE,
        lambda w: ("POST", f"{MLFLOW}/experiments/create", {"json": {"name": "A"}}),
    ),
    ("POST", f"{MLFLOW}/runs/create"): (
        WRITE,
        lambda w: ("POST", f"{MLFLOW}/runs/create", {"json": {"experiment_id": "A", "run_name": "mlflow"}}),
    ),
    ("POST", f"{MLFLOW}/runs/update"): (
        WRITE,
        lambda w: ("POST", f"{MLFLOW}/runs/update", {"json": {"run_id": w.run_id, "status": "RUNNING"}}),
    ),
    ("POST", f"{MLFLOW}/runs/search"): (
        READ,
        lambda w: ("POST", f"{MLFLOW}/runs/search", {"json": {"experiment_ids": ["A"]}}),
    ),
    ("GET", f"{MLFLOW}/runs/get"): (READ, lambda w: ("GET", f"{MLFLOW}/runs/get", {"params": {"run_id": w.run_id}})),
    ("POST", f"{MLFLOW}/runs/log-batch"): (
        WRITE,
        lambda w: (
            "POST",
            f"{MLFLOW}/runs/log-batch",
            {
                "json": {
                    "run_id": w.run_id,
                    "metrics": [{"key": "m", "value": 1.0, "step": 102}],
                    "params": [{"key": "lr", "value": "0.1"}],
                    "tags": [{"key": "t", "value": "x"}],
                }
            },
        ),
    ),
    ("POST", f"{MLFLOW}/runs/log-metric"): (
        WRITE,
        lambda w: (
            "POST",
            f"{MLFLOW}/runs/log-metric",
            {"json": {"run_id": w.run_id, "key": "m", "value": 2.0, "step": 101}},
        ),
    ),
    ("POST", f"{MLFLOW}/runs/log-parameter"): (
        WRITE,
        lambda w: ("POST", f"{MLFLOW}/runs/log-parameter", {"json": {"run_id": w.run_id, "key": "bs", "value": "8"}}),
    ),
    ("POST", f"{MLFLOW}/runs/set-tag"): (
        WRITE,
        lambda w: ("POST", f"{MLFLOW}/runs/set-tag", {"json": {"run_id": w.run_id, "key": "team", "value": "rl"}}),
    ),
    ("GET", f"{MLFLOW}/metrics/get-history"): (
        READ,
        lambda w: ("GET", f"{MLFLOW}/metrics/get-history", {"params": {"run_id": w.run_id, "metric_key": "a"}}),
    ),
}


def by_id(path: str) -> bool:
    """The operation names one of project A's resources by its id (a run, rule or alert), not by its project."""
    by_project = (f"{MLFLOW}/experiments", f"{MLFLOW}/runs/create", f"{MLFLOW}/runs/search")
    mlflow_run = path.startswith(MLFLOW) and not path.startswith(by_project)
    return mlflow_run or any(part in path for part in ("{run_id}", "{rule_id}", "{alert_id}"))


def expected(need: str, caller: str, path: str) -> str:
    """ "2xx", or the exact refusal: 401 without a valid token, 403 for the wrong scope or a project named by
    the caller, 404 for another project's resource named by id (the answer of an unknown id: no existence leak)."""
    if need == PUBLIC or caller == "auth off":
        return "2xx"
    if caller in ("no token", "bad token"):
        return "401"
    if caller.endswith("B"):
        if need == LIST:
            return "2xx"
        if need == WRITE and caller == "read B":
            return "403"
        return "404" if by_id(path) else "403"
    return "403" if need == WRITE and caller == "read A" else "2xx"


def seed(client: TestClient, tokens: dict[str, str | None]) -> World:
    world = World(client, tokens, run_id="", rule_id=0, alert_id=0)
    headers = world.as_("write A")
    world.rule_id = world.new_rule()
    run = client.post("/api/v1/runs", json={"project": "A", "name": "run-a"}, headers=headers)
    world.run_id = run.json()["run_id"]
    records = [
        {
            "step": s,
            "scalars": {"a": 1.0},
            "histograms": {"h": {"lo": 0.0, "hi": 1.0, "counts": [1, 2]}},
            "outliers": [{"sample": 0, "position": 1, "x": 0.5, "A": 1.0, "text": "tok"}],
        }
        for s in range(3)
    ]
    stored = client.post(
        f"/api/v1/runs/{world.run_id}/records", json={"batch_id": "seed", "records": records}, headers=headers
    )
    assert stored.status_code == 200, stored.text
    alerts = client.get("/api/v1/alerts", params={"project": "A"}, headers=headers).json()["alerts"]
    world.alert_id = alerts[0]["id"]
    return world


@pytest.fixture
def worlds(migrated_url: str) -> Iterator[dict[bool, World]]:
    """Two apps over one database: auth off and auth on, with tokens for projects A and B."""
    store = open_store(migrated_url)
    try:
        tokens: dict[str, str | None] = {
            "no token": None,
            "bad token": "mhpo_not-a-token",
            "auth off": None,
            "read A": store.create_token("A", "read"),
            "write A": store.create_token("A", "write"),
            "read B": store.create_token("B", "read"),
            "write B": store.create_token("B", "write"),
        }
    finally:
        store.close()
    with (
        TestClient(create_app(Settings(db=migrated_url, auth=True, dashboard=False))) as on,
        TestClient(create_app(Settings(db=migrated_url, auth=False, dashboard=False))) as off,
    ):
        world_on = seed(on, tokens)
        yield {True: world_on, False: World(off, tokens, world_on.run_id, world_on.rule_id, world_on.alert_id)}


def outcome(status: int) -> str:
    return "2xx" if 200 <= status < 300 else str(status)


def test_every_route_is_in_the_matrix(worlds: dict[bool, World]) -> None:
    schema = worlds[True].client.get("/openapi.json").json()
    documented = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    assert documented | {("GET", "/metrics")} == set(OPERATIONS)


def test_auth_matrix(worlds: dict[bool, World]) -> None:
    rows, wrong = [], []
    for (method, path), (need, build) in OPERATIONS.items():
        cells = []
        for caller in CALLERS:
            world = worlds[caller != "auth off"]
            verb, url, kwargs = build(world)
            headers = {**kwargs.pop("headers", {}), **world.as_(caller)}
            response: httpx.Response = world.client.request(verb, url, headers=headers, **kwargs)
            cells.append(str(response.status_code))
            if outcome(response.status_code) != expected(need, caller, path):
                wrong.append(f"{method} {path} as {caller}: {response.status_code} {response.text[:200]}")
        rows.append((f"{method} {path}", need, *cells))
    print_table(("operation", "needs", *CALLERS), rows)
    assert not wrong, "\n".join(wrong)


def test_lists_show_only_the_callers_project(worlds: dict[bool, World]) -> None:
    world = worlds[True]
    for caller in ("read B", "write B"):
        headers = world.as_(caller)
        assert world.client.get("/api/v1/projects", headers=headers).json()["projects"] == []
        assert world.client.get("/api/v1/runs", headers=headers).json()["runs"] == []
        assert world.client.get("/api/v1/alert-rules", headers=headers).json()["rules"] == []
        assert world.client.get("/api/v1/alerts", headers=headers).json()["alerts"] == []


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
