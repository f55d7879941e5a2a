"""The client's requests match the server's models (contract C1 in docs/contracts.md): the two stay in step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

import mhpo
from mhpo_server.schemas import RecordsIn, RunCreate
from tests.client.helpers import histogram
from tests.fixtures.server import free_port


def test_spooled_requests_validate_against_the_server_models(tmp_path: Path) -> None:
    run = mhpo.init(
        "contract",
        "shapes",
        config={"c": 1.5, "nested": {"eps": [0.2, 0.28]}},
        loss="mhpo",
        server=f"http://127.0.0.1:{free_port()}",
        spool_dir=tmp_path,
        flush_interval=0.05,
    )
    hist = {**histogram(3), "counts": np.arange(64, dtype=np.int64), "sum": np.float32(1.5)}
    outlier = {"sample": 1, "position": 9, "token_id": None, "text": "", "x": 3.0, "A": 0.5, "zeta": None}
    run.log(
        np.int64(3),
        {"ratio/mean": np.float64(0.01), "nan": math.nan, "inf": -math.inf},
        histograms={"log_ratio": hist},
        outliers=[outlier],
        time=1_700_000_000.0,
    )
    report = run.finish(timeout=0.3)

    created = RunCreate.model_validate_json((report.spool_dir / "run.json").read_bytes())
    assert (
        str(created.run_id) == run.id
        and created.loss == "mhpo"
        and created.config == {"c": 1.5, "nested": {"eps": [0.2, 0.28]}}
    )
    (batch,) = report.spool_dir.glob("*-n1.json")
    records = RecordsIn.model_validate_json(batch.read_bytes()).records
    (record,) = records
    assert record.step == 3 and record.time == 1_700_000_000.0
    assert math.isnan(record.scalars["nan"]) and record.scalars["inf"] == -math.inf
    assert record.histograms["log_ratio"].counts == list(range(64))
    assert record.outliers[0].position == 9
    assert json.loads(batch.read_bytes())["batch_id"] in batch.name


def test_non_finite_numbers_travel_as_strings_or_bare_tokens() -> None:
    """C1: a record's numbers may be "NaN" / "Infinity" / "-Infinity" (protobuf's JSON, other languages)
    or the bare tokens Python's json module writes; both validate to the same floats."""
    strings = {
        "step": 0,
        "scalars": {"a": "NaN", "b": "-Infinity"},
        "histograms": {"h": {**histogram(0), "min": "NaN"}},
    }
    bare = {
        "step": 0,
        "scalars": {"a": math.nan, "b": -math.inf},
        "histograms": {"h": {**histogram(0), "min": math.nan}},
    }
    for record in (strings, bare):
        (parsed,) = RecordsIn.model_validate_json(json.dumps({"batch_id": "b", "records": [record]})).records
        assert math.isnan(parsed.scalars["a"]) and parsed.scalars["b"] == -math.inf
        assert math.isnan(parsed.histograms["h"].min)
