"""MLflow reads answer as MLflow's do, driven by the real `mlflow` client on SQLite and PostgreSQL:
latest metrics in runs/get, runs/search, paged metric history, concurrent set-tag, re-logged steps."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlflow
import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.fixtures.server import LiveServer

MLFLOW = "/api/2.0/mlflow"


def test_get_run_returns_the_latest_value_of_each_metric(live_server_db: LiveServer, tracking) -> None:
    tracking(live_server_db.url)
    mlflow.set_experiment("latest")
    with mlflow.start_run() as active:
        mlflow.log_metric("loss", 3.0, step=1)
        mlflow.log_metric("loss", 2.0, step=5)
        mlflow.log_metric("loss", 2.5, step=3)  # logged later, at an earlier step: not the latest
        mlflow.log_metric("nan_loss", math.nan, step=2)
        run_id = active.info.run_id
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["loss"] == 2.0 and math.isnan(metrics["nan_loss"])
    raw = httpx.get(f"{live_server_db.url}{MLFLOW}/runs/get", params={"run_id": run_id}).json()
    loss = next(m for m in raw["run"]["data"]["metrics"] if m["key"] == "loss")
    assert (loss["step"], loss["value"]) == (5, 2.0)


def test_a_run_with_more_keys_than_a_read_returns_ends_and_reads_its_first_keys(
    live_server_db: LiveServer, tracking
) -> None:
    """The mlflow client reads the run when it ends it: more metric keys than MHPO_MAX_KEYS_PER_READ
    (1,000) must not make `with mlflow.start_run()` raise and leave the run running."""
    tracking(live_server_db.url)
    mlflow.set_experiment("wide")
    with mlflow.start_run() as active:
        mlflow.log_metrics({f"m{i:04d}": float(i) for i in range(1_500)}, step=0)
        run_id = active.info.run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(run.data.metrics) == [f"m{i:04d}" for i in range(1_000)]
    raw = httpx.get(f"{live_server_db.url}{MLFLOW}/runs/get", params={"run_id": run_id})
    assert raw.headers["MHPO-Truncated-Metrics"] == run_id
    found = MlflowClient().search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in found] == [run_id] and len(found[0].data.metrics) == 1_000


def test_search_runs_pages_newest_first(live_server_db: LiveServer, tracking) -> None:
    tracking(live_server_db.url)
    experiment = mlflow.set_experiment("searched").experiment_id
    ids = []
    for i in range(5):
        with mlflow.start_run(run_name=f"r{i}") as active:
            mlflow.log_metric("score", float(i), step=0)
            ids.append(active.info.run_id)
    client = MlflowClient()
    found = client.search_runs([experiment])
    assert [r.info.run_id for r in found] == ids[::-1]
    assert [r.data.metrics["score"] for r in found] == [4.0, 3.0, 2.0, 1.0, 0.0]
    first = client.search_runs([experiment], max_results=2, order_by=["attributes.start_time ASC"])
    assert [r.info.run_id for r in first] == ids[:2] and first.token
    rest = client.search_runs([experiment], max_results=10, order_by=["start_time ASC"], page_token=first.token)
    assert [r.info.run_id for r in rest] == ids[2:] and not rest.token
    named = client.search_runs([experiment], filter_string="attributes.run_name = 'r3'")
    assert [r.info.run_name for r in named] == ["r3"]
    finished = client.search_runs([experiment], filter_string="attributes.status != 'FINISHED'")
    assert list(finished) == []
    with pytest.raises(MlflowException, match="not supported"):
        client.search_runs([experiment], filter_string="metrics.score > 1")


def test_metric_history_is_paged_and_complete(sqlite_url: str, tracking) -> None:
    with LiveServer(sqlite_url, env={"MHPO_MAX_HISTORY_ROWS": "100"}) as server:
        tracking(server.url)
        with mlflow.start_run() as active:
            run_id = active.info.run_id
            client = MlflowClient()
            for start in range(0, 250, 50):
                client.log_batch(run_id, metrics=[Metric("m", float(s), 0, s) for s in range(start, start + 50)])
        history = client.get_metric_history(run_id, "m")  # the client follows next_page_token
        assert [m.step for m in history] == list(range(250))
        page = httpx.get(
            f"{server.url}{MLFLOW}/metrics/get-history",
            params={"run_id": run_id, "metric_key": "m", "max_results": 25000},
        ).json()
        assert len(page["metrics"]) == 100 and page["next_page_token"]


def test_concurrent_set_tag_keeps_every_tag(live_server_db: LiveServer, tracking) -> None:
    tracking(live_server_db.url)
    with mlflow.start_run() as active:
        run_id = active.info.run_id
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda i: MlflowClient().set_tag(run_id, f"tag{i}", str(i)), range(20)))
        list(pool.map(lambda i: MlflowClient().log_param(run_id, f"param{i}", str(i)), range(20)))
    data = MlflowClient().get_run(run_id).data
    assert {k: v for k, v in data.tags.items() if k.startswith("tag")} == {f"tag{i}": str(i) for i in range(20)}
    assert data.params == {f"param{i}": str(i) for i in range(20)}


def test_a_relogged_step_keeps_its_first_value_and_says_so(live_server_db: LiveServer, tracking) -> None:
    tracking(live_server_db.url)
    with mlflow.start_run() as active:
        run_id = active.info.run_id
    url = f"{live_server_db.url}{MLFLOW}/runs/log-batch"
    first = httpx.post(url, json={"run_id": run_id, "metrics": [{"key": "m", "value": 1.0, "step": 3}]})
    assert first.status_code == 200 and "mhpo-ignored-metrics" not in first.headers
    again = httpx.post(url, json={"run_id": run_id, "metrics": [{"key": "m", "value": 9.0, "step": 3}]})
    assert again.status_code == 200 and again.headers["mhpo-ignored-metrics"] == "1"
    assert [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, "m")] == [(3, 1.0)]
