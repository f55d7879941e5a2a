"""The MLflow-compatible endpoint, driven by the real `mlflow` client and by TRL's `report_to="mlflow"`."""

from __future__ import annotations

from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mhpo_server.store import open_store
from tests.fixtures.server import LiveServer
from tests.integrations.conftest import count_reward, cpu_threads, grpo_config, prompts


def runs_of(url: str, project: str, headers: dict[str, str] | None = None) -> list[dict]:
    return httpx.get(f"{url}/api/v1/runs", params={"project": project}, headers=headers).json()["runs"]


def test_the_mlflow_client_logs_a_run(live_server_db: LiveServer, tracking) -> None:
    url = live_server_db.url
    tracking(url)
    mlflow.set_experiment("mlf")
    with mlflow.start_run(run_name="from-mlflow") as active:
        mlflow.log_param("lr", 0.001)
        mlflow.log_params({"batch": 8, "loss": "grpo"})
        mlflow.set_tag("team", "rl")
        mlflow.log_metric("actor/entropy", 1.5, step=1)
        mlflow.log_metrics({"actor/entropy": 1.25, "critic/score/mean": 0.5, "custom": 7.0}, step=2)
        run_id = active.info.run_id
    history = MlflowClient().get_metric_history(run_id, "actor/entropy")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.25)]
    fetched = MlflowClient().get_run(run_id)
    assert fetched.info.status == "FINISHED" and fetched.data.params["lr"] == "0.001"
    assert fetched.data.tags["team"] == "rl"

    [run] = runs_of(url, "mlf")
    assert (run["run_id"], run["name"], run["status"]) == (run_id, "from-mlflow", "finished")
    assert run["config"]["batch"] == "8" and run["config"]["mlflow.tags"]["team"] == "rl"
    series = httpx.get(
        f"{url}/api/v1/runs/{run_id}/scalars", params={"keys": "policy/entropy,actor/entropy,reward/mean,custom"}
    ).json()["series"]
    assert series["policy/entropy"]["value"] == series["actor/entropy"]["value"] == [1.5, 1.25]
    assert series["reward/mean"]["step"] == [2] and series["custom"]["value"] == [7.0]


def test_truncation_and_degenerate_groups_logged_through_mlflow_get_the_product_keys(
    live_server: LiveServer, tracking
) -> None:
    """TRL's and verl's names, sent by the MLflow client (`log-batch`), are stored under the product's keys too."""
    from mlflow.entities import Metric

    url = live_server.url
    tracking(url)
    mlflow.set_experiment("mlf-signals")
    with mlflow.start_run(run_name="trl-names") as trl_run:
        mlflow.log_metrics({"frac_reward_zero_std": 0.25, "completions/clipped_ratio": 0.5}, step=1)
        mlflow.log_metrics({"frac_reward_zero_std": 1.0, "completions/clipped_ratio": 1.0}, step=2)
    with mlflow.start_run(run_name="verl-names") as verl_run:
        client, now = MlflowClient(), 1_700_000_000_000
        metrics = [Metric("response_length/clip_ratio", v, now, step) for step, v in ((1, 0.125), (2, 0.875))]
        client.log_batch(verl_run.info.run_id, metrics=metrics)
    expected = {
        trl_run.info.run_id: {"group/degenerate_frac": [0.25, 1.0], "policy/truncated_frac": [0.5, 1.0]},
        verl_run.info.run_id: {"policy/truncated_frac": [0.125, 0.875]},
    }
    for run_id, keys in expected.items():
        series = httpx.get(f"{url}/api/v1/runs/{run_id}/scalars", params={"keys": ",".join(keys)}).json()["series"]
        for key, values in keys.items():
            assert (series[key]["step"], series[key]["value"]) == ([1, 2], values), (run_id, key)


def test_unknown_routes_and_runs_answer_mlflow_errors(live_server: LiveServer, tracking) -> None:
    url = live_server.url
    r = httpx.post(f"{url}/api/2.0/mlflow/registered-models/create", json={"name": "m"})
    assert r.status_code == 404 and r.json()["error_code"] == "ENDPOINT_NOT_FOUND"
    r = httpx.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": "nope"})
    assert r.status_code == 404 and r.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    r = httpx.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "none-yet"})
    assert r.status_code == 404 and r.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    tracking(url)
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        MlflowClient().get_run("00000000-0000-0000-0000-000000000000")


def test_tokens_are_honoured(sqlite_url: str, tracking) -> None:
    with LiveServer(sqlite_url, env={"MHPO_AUTH": "1"}) as server:
        store = open_store(sqlite_url)
        write, other = store.create_token("secure", "write"), store.create_token("elsewhere", "write")
        r = httpx.post(f"{server.url}/api/2.0/mlflow/runs/create", json={"experiment_id": "secure"})
        assert r.status_code == 401 and r.json()["error_code"] == "UNAUTHENTICATED"
        tracking(server.url, other)
        with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
            MlflowClient().create_run("secure")
        tracking(server.url, write)
        mlflow.set_experiment("secure")
        with mlflow.start_run(run_name="authed"):
            mlflow.log_metric("loss", 0.25, step=3)
        [run] = runs_of(server.url, "secure", {"Authorization": f"Bearer {write}"})
        assert run["name"] == "authed" and run["last_step"] == 3


def test_trl_report_to_mlflow_lands_in_mhpo(
    tiny_model_dir: Path, tmp_path: Path, live_server: LiveServer, tracking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain `trl.GRPOTrainer`, no integration code: transformers' MLflowCallback streams into MHPO Monitor."""
    from trl import GRPOTrainer

    cpu_threads()
    tracking(live_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trl-mlflow")
    args = grpo_config(tmp_path, max_steps=2, report_to=["mlflow"], run_name="plain-trl")
    GRPOTrainer(model=str(tiny_model_dir), reward_funcs=count_reward, args=args, train_dataset=prompts()).train()
    [run] = runs_of(live_server.url, "trl-mlflow")
    assert run["name"] == "plain-trl" and run["status"] == "finished"
    assert run["config"]["num_iterations"] == "2"
    keys = httpx.get(f"{live_server.url}/api/v1/runs/{run['run_id']}/keys").json()["scalars"]
    assert {"entropy", "policy/entropy", "grad_norm", "grad/norm", "clip_ratio/region_mean", "ratio/clip_frac"} <= set(
        keys
    )
    series = httpx.get(f"{live_server.url}/api/v1/runs/{run['run_id']}/scalars", params={"keys": "grad/norm"}).json()
    assert series["series"]["grad/norm"]["step"] == [1, 2]
