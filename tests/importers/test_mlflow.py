"""`mhpo import mlflow`: an MLflow file store written by the `mlflow` client, imported with params, tags,
full metric histories, TRL names mapped and flags computed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.importers.conftest import run_import

STEPS = 1_200  # more than one page (1,000) of an MLflow history


@pytest.fixture
def mlruns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two runs in experiment "grpo" and one in "other", logged with MlflowClient into a file store."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 writes file stores only when told to
    store = tmp_path / "mlruns"
    client = MlflowClient(tracking_uri=store.as_uri())
    grpo = client.create_experiment("grpo")
    for name, nan_at in (("run-a", 700), ("run-b", None)):
        run = client.create_run(grpo, run_name=name, tags={"team": "rl"})
        run_id = run.info.run_id
        client.log_param(run_id, "learning_rate", "1e-6")
        client.log_param(run_id, "hf_token", "hf_secret_value")
        metrics = []
        for step in range(STEPS):
            entropy = math.nan if step == nan_at else 1.0 - step / (2 * STEPS)
            metrics += [Metric("entropy", entropy, 1_700_000_000_000 + step * 1000, step)]
            metrics += [Metric("reward", step / STEPS, 1_700_000_000_000 + step * 1000, step)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        client.set_terminated(run_id, "FAILED" if nan_at else "FINISHED")
    other = client.create_experiment("other")
    client.set_terminated(client.create_run(other, run_name="lone").info.run_id)
    return store


def test_file_store_imports_params_tags_histories_and_flags(
    mlruns: Path, migrated: str, api_on, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_import(
        "mlflow", "--tracking-uri", str(mlruns), "--experiment", "grpo", "--db", migrated, capsys=capsys
    )
    assert code == 0, err
    assert f"imported 2 runs, {4 * STEPS} points" in out
    api = api_on(migrated)
    runs = {r["name"]: r for r in api.runs("grpo")}
    assert set(runs) == {"run-a", "run-b"} and api.runs("other") == []
    a = runs["run-a"]
    assert a["status"] == "failed" and runs["run-b"]["status"] == "finished"
    assert a["config"]["learning_rate"] == "1e-6" and a["config"]["hf_token"] == "[redacted]"
    assert a["config"]["mlflow.tags"]["team"] == "rl"
    entropy = api.series(a["run_id"], "policy/entropy")  # TRL's "entropy", mapped; the original kept
    assert entropy["step"] == list(range(STEPS)) == api.series(a["run_id"], "entropy")["step"]
    assert entropy["value"][10] == pytest.approx(1.0 - 10 / (2 * STEPS))
    assert api.series(a["run_id"], "reward/mean")["value"][-1] == pytest.approx((STEPS - 1) / STEPS)
    assert [e["step"] for e in api.events(a["run_id"]) if e["kind"] == "non_finite"] == [700]
    assert not [e for e in api.events(runs["run-b"]["run_id"]) if e["kind"] == "non_finite"]


def test_every_experiment_and_a_missing_one(
    mlruns: Path, sqlite_url: str, api_on, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_import("mlflow", "--tracking-uri", mlruns.as_uri(), "--db", sqlite_url, capsys=capsys)
    assert code == 0, err
    assert "imported 3 runs" in out
    code, out, err = run_import("mlflow", "--tracking-uri", str(mlruns), "--db", sqlite_url, capsys=capsys)
    assert code == 0 and "imported 3 runs" in out and " 0 items stored" in out  # the same store, found again
    assert [r["name"] for r in api_on(sqlite_url).runs("other")] == ["lone"]
    code, _, err = run_import(
        "mlflow", "--tracking-uri", str(mlruns), "--experiment", "nope", "--db", sqlite_url, capsys=capsys
    )
    assert code == 2 and "no experiment named 'nope'" in err and "grpo" in err
