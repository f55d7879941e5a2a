"""The entropy forecast of a run (`GET /api/v1/runs/{id}/forecast`) and the flag kinds (`GET /api/v1/flag-kinds`),
over a real app and database."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from mhpo_server.monitoring import DEFAULT_PARAMS, KINDS, History, latest_forecast
from mhpo_server.monitoring.params import CollapseParams
from tests.server.conftest import new_run, post_json

UPDATES = 2  # optimizer steps per rollout: update 0 is on-policy, the forecast reads one point per rollout
FORECAST_FIELDS = ("step", "reference", "level", "fraction", "slope", "z", "cov", "steps_left", "crossing_step")


def rollout_records(rollouts: int, first: int = 0) -> list[dict[str, Any]]:
    """Rollouts whose on-policy entropy falls 0.004 per rollout from 2.0 (the later update logs more, which
    the forecast must not read), with a positive log-prob/advantage covariance."""
    out = []
    for rollout in range(first, first + rollouts):
        for update in range(UPDATES):
            entropy = 2.0 - 0.004 * rollout + 0.5 * update + 0.01 * ((rollout * 7) % 3)
            scalars = {
                "policy/entropy": entropy,
                "policy/cov_logp_adv": 0.01,
                "train/rollout": float(rollout),
                "train/update_index": float(update),
                "train/loss": 0.1,
            }
            out.append({"step": rollout * UPDATES + update, "scalars": scalars})
    return out


def post(client: TestClient, run_id: str, records: list[dict[str, Any]], size: int = 100) -> None:
    for i in range(0, len(records), size):
        body = {"batch_id": f"b{i}", "records": records[i : i + size]}
        response = post_json(client, f"/api/v1/runs/{run_id}/records", body)
        assert response.status_code == 200, response.text


def whole_history(records: list[dict[str, Any]]) -> History:
    return History.from_rows((k, r["step"], v) for r in records for k, v in r["scalars"].items())


def expected(records: list[dict[str, Any]], params: CollapseParams) -> dict[str, Any]:
    forecast = latest_forecast(whole_history(records), params)
    assert forecast is not None
    return {**forecast.as_dict(), "spacing": forecast.spacing}


def test_the_forecast_of_a_long_run_is_the_one_its_whole_history_gives(client: TestClient) -> None:
    """200 rollouts: far more points than the window read (the first points and the recent ones), the same forecast."""
    records = rollout_records(200)
    run_id = new_run(client)
    post(client, run_id, records)
    answer = client.get(f"/api/v1/runs/{run_id}/forecast")
    assert answer.status_code == 200, answer.text
    got = answer.json()
    want = expected(records, DEFAULT_PARAMS.collapse)
    assert got["reason"] is None and got["unit"] == "optimizer steps" and got["key"] == "policy/entropy"
    assert got["floor"] == 0.25 and got["confident"] == want["confident"] and got["spacing"] == UPDATES
    for field in FORECAST_FIELDS:
        assert got[field] == pytest.approx(want[field]), field
    assert got["step"] == 398 and got["cov"] == pytest.approx(0.01)
    assert got["reference"] == pytest.approx(2.0, abs=0.03) and 0 < got["steps_left"] < 2000
    assert got["crossing_step"] == got["step"] + got["steps_left"]


def test_the_project_parameters_set_the_forecast(client: TestClient) -> None:
    records = rollout_records(60)
    run_id = new_run(client, project="halfway")
    post(client, run_id, records)
    before = client.get(f"/api/v1/runs/{run_id}/forecast").json()
    overrides = {"collapse": {"forecast": {"floor": 0.5}}}
    assert client.put("/api/v1/projects/halfway/flag-params", json=overrides).status_code == 200
    after = client.get(f"/api/v1/runs/{run_id}/forecast").json()
    want = expected(records, DEFAULT_PARAMS.merged(overrides).collapse)
    assert after["floor"] == 0.5 and after["steps_left"] == want["steps_left"] < before["steps_left"]


def test_without_a_forecast_every_field_is_null_and_the_reason_says_why(client: TestClient) -> None:
    fresh = new_run(client, name="fresh")
    short = new_run(client, name="short")
    post(client, short, rollout_records(10))
    other = new_run(client, name="no entropy")
    post(client, other, [{"step": s, "scalars": {"train/loss": 1.0}} for s in range(50)])
    reasons = {}
    for run_id in (fresh, short, other):
        got = client.get(f"/api/v1/runs/{run_id}/forecast").json()
        assert all(got[f] is None for f in (*FORECAST_FIELDS, "spacing", "confident")), got
        reasons[run_id] = got["reason"]
    assert reasons[fresh] == "the run has logged no step yet"
    assert reasons[short] == "not enough rollouts yet: 10 of the 35 points of policy/entropy the forecast needs"
    assert "logs no policy/entropy" in reasons[other]
    assert client.get("/api/v1/runs/00000000-0000-4000-8000-000000000000/forecast").status_code == 404


def test_the_flag_kinds_are_the_detectors_and_rules_accept_exactly_them(client: TestClient) -> None:
    assert client.get("/api/v1/flag-kinds").json() == {"kinds": list(KINDS)}
    schema = client.get("/openapi.json").json()["components"]["schemas"]["FlagCondition"]
    assert schema["properties"]["kind"]["enum"] == [*KINDS, "*"]
    for kind in (*KINDS, "*"):
        rule = {"name": f"on {kind}", "project": "p", "condition": {"type": "flag", "kind": kind}}
        created = client.post("/api/v1/alert-rules", json=rule)
        assert created.status_code == 201 and created.json()["condition"]["kind"] == kind, created.text
    bad = client.post(
        "/api/v1/alert-rules", json={"name": "x", "project": "p", "condition": {"type": "flag", "kind": "meltdown"}}
    )
    assert bad.status_code == 422
    (error,) = bad.json()["detail"]
    assert (
        error["loc"][-1] == "kind" and "'meltdown' is not a flag kind" in error["msg"] and "no_signal" in error["msg"]
    )
