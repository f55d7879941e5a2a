"""Strict JSON both ways: non-finite numbers are accepted as the strings "NaN", "Infinity", "-Infinity"
(protobuf's JSON, as MLflow and other languages write them; the bare tokens still work) and every
answer is JSON a strict parser (a browser's JSON.parse) reads, holding them as those strings."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.testclient import TestClient

from mhpo_dashboard.api import ApiClient
from tests.server.conftest import new_run, post_json


def strict(text: str) -> Any:
    def refuse(token: str) -> float:
        raise AssertionError(f"bare {token} in {text[:200]}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_strings_are_accepted_and_every_answer_is_strict_json(client: TestClient) -> None:
    run_id = new_run(client, config={"warmup": math.inf, "note": "NaN stays text"})
    hist = {"lo": 0.0, "hi": 1.0, "counts": [1, 2], "min": "NaN", "max": "Infinity", "sum": "-Infinity"}
    outlier = {"sample": 0, "position": 1, "x": "Infinity", "A": "-Infinity", "zeta": "NaN", "text": "t"}
    body = {
        "batch_id": "strings",
        "records": [
            {
                "step": 0,
                "scalars": {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.0},
                "histograms": {"h": hist},
            },
            {"step": 1, "scalars": {"a": math.nan, "b": 2.0}, "outliers": [outlier]},  # bare tokens, as Python writes
            {"step": 2, "scalars": {"a": "nan", "b": "1.0"}},  # other spellings stay refused
        ],
    }
    stored = post_json(client, f"/api/v1/runs/{run_id}/records", body)
    assert stored.status_code == 200, stored.text
    assert stored.json()["accepted"] == 8 and {r["key"] for r in stored.json()["rejected"]} == {"a", "b"}
    post_json(
        client,
        f"/api/v1/runs/{run_id}/records",
        {"batch_id": "nan-flag", "records": [{"step": 3, "scalars": {"train/loss": "NaN"}}]},
    )
    reads = [
        f"/api/v1/runs/{run_id}",
        "/api/v1/runs",
        f"/api/v1/runs/{run_id}/scalars?keys=a,b,c,d",
        f"/api/v1/runs/{run_id}/histograms/h",
        f"/api/v1/runs/{run_id}/outliers",
        f"/api/v1/runs/{run_id}/events",
        f"/api/2.0/mlflow/runs/get?run_id={run_id}",
        f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=a",
    ]
    answers = {}
    for path in reads:
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        answers[path] = strict(response.text)
    series = answers[reads[2]]["series"]
    assert series["a"]["value"] == ["NaN", "NaN"] and series["b"]["value"] == ["Infinity", 2.0]
    assert series["c"]["value"] == ["-Infinity"] and series["d"]["value"] == [1.0]
    histogram = answers[reads[3]]
    assert (histogram["min"], histogram["max"], histogram["sum"]) == (["NaN"], ["Infinity"], ["-Infinity"])
    assert answers[reads[4]]["outliers"][0] | {"text": "t"} == {**outlier, "token_id": None}
    assert answers[reads[0]]["config"] == {"warmup": "Infinity", "note": "NaN stays text"}
    assert any(e["kind"] == "non_finite" for e in answers[reads[5]]["events"])

    api = ApiClient("http://testserver", http=client)  # the dashboard reads them back as floats
    values = api.scalars(run_id, ["a", "b", "c"])["series"]
    assert math.isnan(values["a"]["value"][0]) and values["b"]["min"][0] == math.inf
    assert values["c"]["max"] == [-math.inf]
    assert math.isnan(api.histograms(run_id, "h")["min"][0])
    assert api.outliers(run_id, 1)["outliers"][0]["A"] == -math.inf


def test_the_openapi_schema_states_the_strings(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    [scalar] = schemas["RecordIn"]["properties"]["scalars"]["patternProperties"].values()
    assert {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]} in scalar["anyOf"]
    assert {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]} in schemas["OutlierIn"]["properties"]["x"][
        "anyOf"
    ]
