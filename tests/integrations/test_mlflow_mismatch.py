"""Sampler-vs-trainer cases from public reports, logged under TRL's and verl's own names by the real
`mlflow` client into a live server: mapped onto `mismatch/*` and flagged in time, healthy runs never."""

from __future__ import annotations

import time

import httpx
import mlflow
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tests.fixtures.server import LiveServer
from tests.flags.mismatch_cases import trl_healthy, trl_jump, trl_top_k, verl_drift

CASES = {
    # name: (stream, flagged within this many steps of the onset)
    "trl-5312-unsynced-jump": (trl_jump, 2),
    "verl-50x-drift": (verl_drift, 70),
    "trl-6789-top-k-is-mean": (trl_top_k, 0),
    "trl-healthy-gap": (trl_healthy, None),
}


def log_stream(rows: list[dict[str, float]], run_name: str, steps_per_request: int = 10) -> str:
    """The metrics of steps 1..n, ten steps per `log_batch` call (as MLflow's async logging batches them)."""
    mlflow.set_experiment("mismatch")
    client = MlflowClient()
    with mlflow.start_run(run_name=run_name) as active:
        run_id = active.info.run_id
        now = int(time.time() * 1000)
        for start in range(0, len(rows), steps_per_request):
            metrics = [
                Metric(key, value, now + step, step)
                for step, row in enumerate(rows[start : start + steps_per_request], start + 1)
                for key, value in row.items()
            ]
            client.log_batch(run_id, metrics=metrics)
    return run_id


@pytest.mark.parametrize("case", ["trl-5312-unsynced-jump", "trl-6789-top-k-is-mean"])
def test_one_flag_per_event_when_every_step_is_its_own_request(live_server_db: LiveServer, tracking, case: str) -> None:
    """A logger that sends each step alone (MLflow's synchronous `log_metrics`) gets one flag per event and
    severity, as a batched one does: the refractory period holds across requests."""
    build, _ = CASES[case]
    rows, onset = build()
    tracking(live_server_db.url)
    run_id = log_stream(rows, case, steps_per_request=1)
    events = httpx.get(f"{live_server_db.url}/api/v1/runs/{run_id}/events").json()["events"]
    flags = [(e["step"], e["severity"]) for e in events if e["kind"] == "mismatch"]
    assert flags and flags[0][0] >= onset, flags
    severities = [severity for _, severity in flags]
    assert len(severities) == len(set(severities)) <= 2, flags  # a warning, at most escalated once


@pytest.mark.parametrize("case", list(CASES))
def test_reported_cases_are_flagged_in_time_and_healthy_never(live_server_db: LiveServer, tracking, case: str) -> None:
    build, within = CASES[case]
    rows, onset = build()
    tracking(live_server_db.url)
    run_id = log_stream(rows, case)
    api = f"{live_server_db.url}/api/v1/runs/{run_id}"

    events = httpx.get(f"{api}/events").json()["events"]
    flags = [e for e in events if e["kind"] == "mismatch"]
    if onset is None:
        assert flags == []
        return
    assert flags, f"{case}: no mismatch flag"
    first = flags[0]
    assert onset <= first["step"] <= onset + within, (case, first["step"], first["message"])
    assert first["severity"] in ("warning", "critical") and first["evidence"]

    # The originals are kept and the product's keys sit next to them, equal where they mean the same.
    original = next(iter(rows[0]))
    mapped = {
        "sampling/sampling_logp_difference/mean": "mismatch/abs_mean",
        "sampling/importance_sampling_ratio/min": "mismatch/is_min",
        "rollout_corr/kl": "mismatch/kl_k1",
    }[original]
    series = httpx.get(f"{api}/scalars", params={"keys": f"{original},{mapped}"}).json()["series"]
    assert series[original]["value"] == series[mapped]["value"] == pytest.approx([r[original] for r in rows])
