"""Every per-request cost a caller controls has a limit: keys and points per scalars read, histogram cells,
config sizes; a refusal names the limit, its setting and the fix. A key with a comma reads back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from mhpo_dashboard.api import ApiClient
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from tests.fixtures.server import LiveServer
from tests.server.conftest import new_run, post_json


def limited(migrated_url: str, **limits: int) -> TestClient:
    return TestClient(create_app(Settings(db=migrated_url, auth=False, dashboard=False, **limits)))


def write(client: TestClient | httpx.Client, run_id: str, records: list[dict], batch: str = "b") -> None:
    response = post_json(client, f"/api/v1/runs/{run_id}/records", {"batch_id": batch, "records": records})
    assert response.status_code == 200, response.text


def test_a_key_with_a_comma_reads_back_and_the_dashboard_client_shows_it(client: TestClient) -> None:
    run_id = new_run(client)
    write(
        client, run_id, [{"step": s, "scalars": {"loss,clipped": 0.5 + s, "loss": 1.0, "clipped": 2.0}} for s in (0, 1)]
    )
    exact = client.get(f"/api/v1/runs/{run_id}/scalars", params={"key": ["loss,clipped"]})
    assert exact.status_code == 200, exact.text
    assert list(exact.json()["series"]) == ["loss,clipped"]
    assert exact.json()["series"]["loss,clipped"]["value"] == [0.5, 1.5]
    legacy = client.get(f"/api/v1/runs/{run_id}/scalars", params={"keys": "loss,clipped"})  # two keys, as before
    assert sorted(legacy.json()["series"]) == ["clipped", "loss"]
    both = client.get(f"/api/v1/runs/{run_id}/scalars", params={"keys": "loss", "key": ["loss,clipped"]})
    assert list(both.json()["series"]) == ["loss", "loss,clipped"]
    api = ApiClient("http://testserver", http=client)
    assert api.scalars(run_id, ["loss,clipped"])["series"]["loss,clipped"]["value"] == [0.5, 1.5]


def test_a_read_of_all_keys_is_refused_beyond_the_key_limit(migrated_url: str) -> None:
    with limited(migrated_url, max_keys_per_read=10) as client:
        run_id = new_run(client)
        write(client, run_id, [{"step": 0, "scalars": {f"k{i:02d}": 1.0 for i in range(10)}}])
        assert len(client.get(f"/api/v1/runs/{run_id}/scalars").json()["series"]) == 10
        write(client, run_id, [{"step": 1, "scalars": {"k10": 1.0}}], batch="c")
        refused = client.get(f"/api/v1/runs/{run_id}/scalars")
        assert refused.status_code == 422
        assert "MHPO_MAX_KEYS_PER_READ" in refused.text and "key=" in refused.text
        named = client.get(f"/api/v1/runs/{run_id}/scalars", params={"key": ["k10", "k00"]})
        assert list(named.json()["series"]) == ["k10", "k00"]
        too_many = client.get(f"/api/v1/runs/{run_id}/scalars", params={"key": [f"k{i}" for i in range(11)]})
        assert too_many.status_code == 422 and "MHPO_MAX_KEYS_PER_READ" in too_many.text


def test_keys_times_points_is_bounded(migrated_url: str) -> None:
    with limited(migrated_url, max_points_per_read=1000) as client:
        run_id = new_run(client)
        write(client, run_id, [{"step": 0, "scalars": {"a": 1.0, "b": 2.0, "c": 3.0}}])
        assert client.get(f"/api/v1/runs/{run_id}/scalars", params={"max_points": 333}).status_code == 200
        refused = client.get(f"/api/v1/runs/{run_id}/scalars", params={"max_points": 334})
        assert refused.status_code == 422
        assert "MHPO_MAX_POINTS_PER_READ" in refused.text and "fewer keys" in refused.text


def test_a_histogram_read_over_the_cell_limit_is_refused_before_loading(migrated_url: str) -> None:
    with limited(migrated_url, max_histogram_cells=1000) as client:
        run_id = new_run(client)
        hist = {"lo": 0.0, "hi": 1.0, "counts": [1] * 98}  # 100 cells a step with under/overflow
        write(client, run_id, [{"step": s, "histograms": {"h": hist}} for s in range(20)])
        refused = client.get(f"/api/v1/runs/{run_id}/histograms/h", params={"max_steps": 2})
        assert refused.status_code == 422
        assert "MHPO_MAX_HISTOGRAM_CELLS" in refused.text and "start=" in refused.text
        narrowed = client.get(f"/api/v1/runs/{run_id}/histograms/h", params={"start": 5, "end": 14, "max_steps": 2})
        assert narrowed.status_code == 200 and narrowed.json()["step"] == [5, 10]


def test_config_values_and_configs_are_bounded(migrated_url: str) -> None:
    with limited(migrated_url, max_config_value_bytes=1024, max_config_bytes=4096) as client:
        big = post_json(client, "/api/v1/runs", {"project": "p", "name": "r", "config": {"prompt": "é" * 600}})
        assert big.status_code == 422 and "MHPO_MAX_CONFIG_VALUE_BYTES" in big.text
        assert big.json()["detail"][0]["loc"] == ["body", "config"]
        nested = post_json(client, "/api/v1/runs", {"project": "p", "name": "r", "config": {"a": [{"b": "x" * 2000}]}})
        assert nested.status_code == 422 and "MHPO_MAX_CONFIG_VALUE_BYTES" in nested.text
        wide = {f"k{i}": "x" * 500 for i in range(10)}
        whole = post_json(client, "/api/v1/runs", {"project": "p", "name": "r", "config": wide})
        assert whole.status_code == 422 and "MHPO_MAX_CONFIG_BYTES" in whole.text
        assert (
            post_json(client, "/api/v1/runs", {"project": "p", "name": "r", "config": {"lr": 0.1}}).status_code == 201
        )


def test_mlflow_params_and_tags_are_bounded(migrated_url: str) -> None:
    mlflow = "/api/2.0/mlflow"
    with limited(migrated_url, max_config_value_bytes=1024, max_config_bytes=4096) as client:
        run_id = client.post(f"{mlflow}/runs/create", json={"experiment_id": "0"}).json()["run"]["info"]["run_id"]
        big = client.post(f"{mlflow}/runs/log-parameter", json={"run_id": run_id, "key": "p", "value": "x" * 2000})
        assert big.status_code == 400 and "MHPO_MAX_CONFIG_VALUE_BYTES" in big.text
        for i in range(5):
            ok = client.post(f"{mlflow}/runs/set-tag", json={"run_id": run_id, "key": f"t{i}", "value": "x" * 700})
            assert ok.status_code == 200, ok.text
        full = client.post(f"{mlflow}/runs/set-tag", json={"run_id": run_id, "key": "t9", "value": "x" * 700})
        assert full.status_code == 400 and "MHPO_MAX_CONFIG_BYTES" in full.text
        created = client.post(f"{mlflow}/runs/create", json={"tags": [{"key": "n", "value": "x" * 2000}]})
        assert created.status_code == 400 and "MHPO_MAX_CONFIG_VALUE_BYTES" in created.text


@pytest.fixture
def wide_run_server(sqlite_url: str) -> Iterator[tuple[LiveServer, str]]:
    with LiveServer(sqlite_url) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        run_id = new_run(client)
        keys = [f"metric/{i:04d}" for i in range(1000)]
        for chunk in range(0, 300, 50):
            records = [{"step": s, "scalars": dict.fromkeys(keys, float(s))} for s in range(chunk, chunk + 50)]
            write(client, run_id, records, batch=f"b{chunk}")
        yield server, run_id


def abandoned(server: LiveServer) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("mhpo_reads_abandoned_total")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_long_read_stops_when_its_client_goes_away(wide_run_server: tuple[LiveServer, str]) -> None:
    """1,000 keys x 300 steps read in full; the client gives up after 0.3 s and the server stops the read."""
    server, run_id = wide_run_server
    with pytest.raises(httpx.TimeoutException):
        httpx.get(f"{server.url}/api/v1/runs/{run_id}/scalars", params={"max_points": 300}, timeout=0.3)
    deadline = time.monotonic() + 60
    while abandoned(server) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert abandoned(server) == 1
