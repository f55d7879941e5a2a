"""The MLflow endpoint's inputs, on a real server over SQLite and PostgreSQL: unstorable text is
refused naming the field and nothing of the request is stored, secrets in params are redacted,
and numbers are taken exactly as the mlflow client sends them."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import strict_loads
from tests.fixtures.server import LiveServer

API = "/api/2.0/mlflow"
BAD = {"lone surrogate": "\ud800", "NUL": "\x00"}


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    """The body as JSON with \\u escapes, which is how a lone surrogate travels."""
    return httpx.post(f"{url}{API}/{path}", content=json.dumps(body), headers={"Content-Type": "application/json"})


def new_run(url: str) -> str:
    r = post(url, "runs/create", {"experiment_id": "hard", "run_name": "r"})
    assert r.status_code == 200, r.text
    return r.json()["run"]["info"]["run_id"]


def cases(run_id: str, bad: str) -> list[tuple[str, dict[str, Any], str]]:
    """(endpoint, body, the field the error must name); every other part of the body is valid."""
    ok_metric = {"key": "m", "value": 1.0, "step": 1}
    return [
        ("experiments/create", {"name": f"e{bad}"}, "name"),
        ("runs/create", {"experiment_id": f"e{bad}"}, "experiment_id"),
        ("runs/create", {"experiment_id": "hard", "run_name": f"r{bad}"}, "run_name"),
        ("runs/create", {"experiment_id": "hard", "tags": [{"key": "t", "value": f"v{bad}"}]}, "tags.0.value"),
        ("runs/update", {"run_id": run_id, "run_name": f"r{bad}"}, "run_name"),
        ("runs/log-parameter", {"run_id": run_id, "key": f"k{bad}", "value": "v"}, "key"),
        ("runs/log-parameter", {"run_id": run_id, "key": "k", "value": f"v{bad}"}, "value"),
        ("runs/set-tag", {"run_id": run_id, "key": f"k{bad}", "value": "v"}, "key"),
        ("runs/set-tag", {"run_id": run_id, "key": "k", "value": f"v{bad}"}, "value"),
        ("runs/log-metric", {"run_id": run_id, **ok_metric, "key": f"m{bad}"}, "key"),
        (
            "runs/log-batch",
            {"run_id": run_id, "metrics": [ok_metric], "params": [{"key": "k", "value": f"v{bad}"}]},
            "params.0.value",
        ),
        (
            "runs/log-batch",
            {"run_id": run_id, "metrics": [ok_metric], "params": [{"key": f"k{bad}", "value": "v"}]},
            "params.0.key",
        ),
        (
            "runs/log-batch",
            {"run_id": run_id, "params": [{"key": "k", "value": "v"}], "tags": [{"key": f"t{bad}", "value": "v"}]},
            "tags.0.key",
        ),
        (
            "runs/log-batch",
            {
                "run_id": run_id,
                "params": [{"key": "k", "value": "v"}],
                "metrics": [ok_metric, {**ok_metric, "key": f"m{bad}"}],
            },
            "metrics.1.key",
        ),
    ]


@pytest.mark.parametrize("kind", list(BAD))
def test_unstorable_text_is_refused_naming_the_field_and_nothing_is_stored(
    live_server_db: LiveServer, kind: str
) -> None:
    url = live_server_db.url
    run_id = new_run(url)
    for path, body, field in cases(run_id, BAD[kind]):
        r = post(url, path, body)
        assert r.status_code == 400, (path, field, r.text)
        assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE" and field in r.json()["message"], (path, r.text)
    [run] = httpx.get(f"{url}/api/v1/runs").json()["runs"]
    assert (run["run_id"], run["name"], run["config"]) == (run_id, "r", None)
    assert httpx.get(f"{url}/api/v1/runs/{run_id}/keys").json()["scalars"] == []


def test_secret_params_and_tags_are_redacted(live_server_db: LiveServer, tracking) -> None:
    url = live_server_db.url
    tracking(url)
    mlflow.set_experiment("secrets")
    with mlflow.start_run(run_name="s", tags={"webhook_url": "https://hooks.example.com/T0/SECRET3"}) as active:
        mlflow.log_param("hf_token", "hf_SECRET1")
        mlflow.log_params({"openai_api_key": "sk-SECRET2", "lr": 0.1})
        mlflow.set_tag("db-password", "SECRET4")
        run_id = active.info.run_id
    fetched = MlflowClient().get_run(run_id)
    assert fetched.data.params == {"hf_token": "[redacted]", "openai_api_key": "[redacted]", "lr": "0.1"}
    assert fetched.data.tags["db-password"] == fetched.data.tags["webhook_url"] == "[redacted]"
    stored = httpx.get(f"{url}/api/v1/runs/{run_id}").text
    assert "SECRET" not in stored and "[redacted]" in stored


def test_numbers_as_the_mlflow_client_sends_them(live_server_db: LiveServer, tracking) -> None:
    url = live_server_db.url
    run_id = new_run(url)
    # Current clients: JSON numbers, "NaN"/"Infinity" for non-finite values; older ones: int64 as digit strings.
    for metric in (
        {"key": "m", "value": 0.5, "step": 1, "timestamp": 1_700_000_000_000},
        {"key": "m", "value": "NaN", "step": "2", "timestamp": "1700000001000"},
        {"key": "m", "value": "-Infinity", "step": 3},
    ):
        assert post(url, "runs/log-metric", {"run_id": run_id, **metric}).status_code == 200
    tracking(url)
    MlflowClient().log_metric(run_id, "m", math.inf, step=4)
    series = strict_loads(httpx.get(f"{url}/api/v1/runs/{run_id}/scalars", params={"keys": "m"}).text)["series"]["m"]
    assert series["step"] == [1, 2, 3, 4]
    assert series["value"][0] == 0.5 and math.isnan(series["value"][1]) and series["value"][2:] == [-math.inf, math.inf]
    history = httpx.get(f"{url}{API}/metrics/get-history", params={"run_id": run_id, "metric_key": "m"}).json()
    assert [(m["step"], m["timestamp"]) for m in history["metrics"][:2]] == [
        (1, 1_700_000_000_000),
        (2, 1_700_000_001_000),
    ]
    assert [m["value"] for m in history["metrics"]][2:] == ["-Infinity", "Infinity"]
    refused = [
        ("value", True),
        ("value", "1.5"),
        ("value", "nan"),
        ("value", None),
        ("step", 1.5),
        ("step", -1),
        ("step", "1e3"),
        ("step", True),
        ("timestamp", "soon"),
    ]
    for field, value in refused:
        r = post(url, "runs/log-metric", {"run_id": run_id, "key": "m", "value": 1.0, "step": 9, field: value})
        assert r.status_code == 400 and field in r.json()["message"], (field, value, r.text)
    r = post(url, "runs/log-parameter", {"run_id": run_id, "key": "batch", "value": 8})
    assert r.status_code == 400 and "value" in r.json()["message"]
    assert httpx.get(f"{url}/api/v1/runs/{run_id}/scalars", params={"keys": "m"}).json()["series"]["m"]["step"] == [
        1,
        2,
        3,
        4,
    ]


def test_log_batch_keeps_mlflows_limits(live_server_db: LiveServer) -> None:
    """1,000 metrics, 100 params, 100 tags, 1,000 entities in all per request, as MLflow's own server."""
    url = live_server_db.url
    run_id = new_run(url)

    def metrics(n: int) -> list[dict[str, Any]]:
        return [{"key": f"m{i}", "value": 1.0, "step": 0, "timestamp": 0} for i in range(n)]

    def pairs(n: int, prefix: str) -> list[dict[str, str]]:
        return [{"key": f"{prefix}{i}", "value": "v"} for i in range(n)]

    for body, message in (
        ({"metrics": metrics(1001)}, "metrics: 1001 items exceed MLflow's limit of 1000 per request; split the batch"),
        ({"params": pairs(101, "p")}, "params: 101 items exceed MLflow's limit of 100 per request; split the batch"),
        ({"tags": pairs(101, "t")}, "tags: 101 items exceed MLflow's limit of 100 per request; split the batch"),
        ({"metrics": metrics(950), "params": pairs(60, "p")}, "1010 metrics, params and tags"),
    ):
        r = post(url, "runs/log-batch", {"run_id": run_id, **body})
        assert r.status_code == 400 and r.json()["error_code"] == "INVALID_PARAMETER_VALUE", r.text
        assert message in r.json()["message"], r.text
    assert httpx.get(f"{url}/api/v1/runs/{run_id}/keys").json()["scalars"] == []
    r = post(url, "runs/log-batch", {"run_id": run_id, "metrics": metrics(1000)})
    assert r.status_code == 200, r.text
    assert len(httpx.get(f"{url}/api/v1/runs/{run_id}/keys").json()["scalars"]) == 1000
