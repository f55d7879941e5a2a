"""What a refusal tells a caller: nothing of other projects, nothing of the database behind the service.

Another project's run, rule or alert answers exactly what an unknown id answers (no 403
naming the project, no proof the id exists); a rule's `run_id` is checked on PATCH as on
POST; a saved webhook URL goes through the same target policy as delivery.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.store import open_store

MLFLOW = "/api/2.0/mlflow"


@pytest.fixture
def secured(migrated_url: str) -> Iterator[tuple[TestClient, dict[str, dict[str, str]]]]:
    store = open_store(migrated_url)
    try:
        tokens = {f"{scope} {p}": store.create_token(p, scope) for p in ("A", "B") for scope in ("read", "write")}
    finally:
        store.close()
    headers = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
    with TestClient(create_app(Settings(db=migrated_url, auth=True, dashboard=False))) as client:
        yield client, headers


def _rule(run_id: str | None = None) -> dict:
    return {
        "name": f"hot-{uuid.uuid4().hex[:6]}",
        "project": "A",
        "run_id": run_id,
        "condition": {"type": "threshold", "key": "a", "op": ">", "value": 0.5},
    }


def test_another_projects_run_rule_and_alert_answer_like_unknown_ids(
    secured: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, headers = secured
    run_id = client.post(
        "/api/v1/runs", json={"project": "A", "name": "secret-run"}, headers=headers["write A"]
    ).json()["run_id"]
    rule_id = client.post("/api/v1/alert-rules", json=_rule(), headers=headers["write A"]).json()["id"]
    client.post(
        f"/api/v1/runs/{run_id}/records",
        json={"batch_id": "b", "records": [{"step": 0, "scalars": {"a": 1.0}}]},
        headers=headers["write A"],
    )
    alert_id = client.get("/api/v1/alerts", params={"project": "A"}, headers=headers["write A"]).json()["alerts"][0][
        "id"
    ]
    unknown_run, unknown_rule, unknown_alert = str(uuid.uuid4()), 2**30, 2**30 + 1
    pairs = [
        (f"/api/v1/runs/{run_id}", f"/api/v1/runs/{unknown_run}", "GET", None),
        (f"/api/v1/runs/{run_id}/scalars", f"/api/v1/runs/{unknown_run}/scalars", "GET", None),
        (f"/api/v1/runs/{run_id}", f"/api/v1/runs/{unknown_run}", "PATCH", {"status": "failed"}),
        (f"{MLFLOW}/runs/get?run_id={run_id}", f"{MLFLOW}/runs/get?run_id={unknown_run}", "GET", None),
        (f"/api/v1/alert-rules/{rule_id}", f"/api/v1/alert-rules/{unknown_rule}", "GET", None),
        (f"/api/v1/alerts/{alert_id}", f"/api/v1/alerts/{unknown_alert}", "GET", None),
    ]
    for theirs, unknown, method, body in pairs:
        seen = client.request(method, theirs, json=body, headers=headers["write B"])
        missing = client.request(method, unknown, json=body, headers=headers["write B"])
        assert seen.status_code == missing.status_code == 404, (theirs, seen.text)
        ids = (run_id, unknown_run, str(rule_id), str(unknown_rule), str(alert_id), str(unknown_alert))
        pattern = re.compile("|".join(rf"\b{re.escape(i)}\b" for i in ids))
        scrub = [pattern.sub("ID", t) for t in (seen.text, missing.text)]
        assert scrub[0] == scrub[1], (theirs, scrub)
        assert "'A'" not in seen.text and "secret-run" not in seen.text


def test_patching_a_rule_checks_its_run_as_creating_does(
    secured: tuple[TestClient, dict[str, dict[str, str]]],
) -> None:
    client, headers = secured
    own = client.post("/api/v1/runs", json={"project": "A", "name": "a"}, headers=headers["write A"]).json()["run_id"]
    other = client.post("/api/v1/runs", json={"project": "B", "name": "b"}, headers=headers["write B"]).json()["run_id"]
    rule_id = client.post("/api/v1/alert-rules", json=_rule(), headers=headers["write A"]).json()["id"]
    for bad in (other, str(uuid.uuid4())):
        created = client.post("/api/v1/alert-rules", json=_rule(bad), headers=headers["write A"])
        patched = client.patch(f"/api/v1/alert-rules/{rule_id}", json={"run_id": bad}, headers=headers["write A"])
        assert created.status_code == patched.status_code == 422, (created.text, patched.text)
        assert patched.json()["detail"][0]["loc"] == ["body", "run_id"]
        assert "'B'" not in patched.text
    rule = client.get(f"/api/v1/alert-rules/{rule_id}", headers=headers["write A"]).json()
    assert rule["run_id"] is None
    moved = client.patch(f"/api/v1/alert-rules/{rule_id}", json={"run_id": own}, headers=headers["write A"])
    assert moved.status_code == 200 and moved.json()["run_id"] == own
    cleared = client.patch(f"/api/v1/alert-rules/{rule_id}", json={"run_id": None}, headers=headers["write A"])
    assert cleared.status_code == 200 and cleared.json()["run_id"] is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1../hook",
        "http://127.0.0.1./hook",
        "http://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
        "http://[2002:a00:1::]/hook",  # 6to4 of 10.0.0.1
        "http://[fec0::1]/hook",  # site-local
        "https://hooks.example.com/" + "a" * 5000,
    ],
)
def test_internal_or_oversized_webhook_urls_are_refused_when_saved(client: TestClient, url: str) -> None:
    rule = {**_rule(), "channels": ["webhook"], "webhook_url": url}
    created = client.post("/api/v1/alert-rules", json=rule)
    assert created.status_code == 422, created.text
    assert len(created.text) < 2000
    ok = client.post("/api/v1/alert-rules", json={**rule, "webhook_url": "https://hooks.example.com/x"})
    assert ok.status_code == 201, ok.text
    patched = client.patch(f"/api/v1/alert-rules/{ok.json()['id']}", json={"webhook_url": url})
    assert patched.status_code == 422, patched.text
    if len(url) > 2048:
        assert "MHPO_WEBHOOK_MAX_URL_LENGTH" in created.text
