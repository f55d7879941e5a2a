"""The client against a real `mhpo serve` process: delivery, tokens, restarts, refusals."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import mhpo
from mhpo.client import MHPOClientError
from mhpo.client._spool import server_key
from tests.client.conftest import PROJECT
from tests.client.helpers import Target, histogram, scalars
from tests.fixtures.server import REPO_ROOT

FAST = {"flush_interval": 0.05, "max_backoff": 0.3}


def test_records_arrive_with_histograms_outliers_and_non_finite_values(shared_server: Target, tmp_path: Path) -> None:
    run = mhpo.init(
        PROJECT,
        "roundtrip",
        config={"lr": 1e-6, "loss": {"c": 1.5}},
        loss="mhpo",
        server=shared_server.url,
        token=shared_server.token,
        spool_dir=tmp_path,
        **FAST,
    )
    outlier = {"sample": 0, "position": 3, "token_id": 17, "text": "x", "x": 2.5, "A": -1.0, "zeta": 4.0}
    for step in range(200):
        extra = {"weird/nan": math.nan, "weird/inf": math.inf} if step == 7 else {}
        run.log(step, {**scalars(step), **extra}, histograms={"log_ratio": histogram(step)}, outliers=[outlier])
    report = run.finish(timeout=30)

    assert report.complete, report
    assert report.sent_records == 200 and report.replayed_batches == 0
    assert sorted(shared_server.stored_steps(run.id, "train/loss")) == list(range(200))
    info = shared_server.stored_run(run.id)
    assert (info["project"], info["name"], info["loss"], info["status"]) == (PROJECT, "roundtrip", "mhpo", "finished")
    assert info["config"] == {"lr": 1e-6, "loss": {"c": 1.5}}
    weird = shared_server.get_json(f"/api/v1/runs/{run.id}/scalars?keys=weird/nan,weird/inf")["series"]
    assert math.isnan(weird["weird/nan"]["value"][0]) and weird["weird/inf"]["value"] == [math.inf]
    hist = shared_server.get_json(f"/api/v1/runs/{run.id}/histograms/log_ratio?max_steps=1000")
    assert hist["step"] == list(range(200)) and hist["counts"][5] == histogram(5)["counts"]
    assert shared_server.get_json(f"/api/v1/runs/{run.id}/outliers?step=199")["outliers"][0]["text"] == "x"
    assert not report.spool_dir.exists()


def test_the_token_comes_from_the_environment_and_a_missing_one_fails_at_init(
    shared_sqlite_server: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = shared_sqlite_server.url
    with pytest.raises(MHPOClientError, match="401"):
        mhpo.init(PROJECT, "anonymous", server=url, spool_dir=tmp_path)
    monkeypatch.setenv("MHPO_TOKEN", str(shared_sqlite_server.token))
    run = mhpo.init(PROJECT, "from-env", server=url, spool_dir=tmp_path, **FAST)
    run.log(0, {"train/loss": 1.0})
    assert run.finish(timeout=30).complete
    assert shared_sqlite_server.stored_steps(run.id, "train/loss") == [0]


def test_one_bad_record_is_refused_alone(
    shared_sqlite_server: Target, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = mhpo.init(
        PROJECT,
        "refusal",
        server=shared_sqlite_server.url,
        token=shared_sqlite_server.token,
        spool_dir=tmp_path,
        batch_size=1000,
        flush_interval=5.0,
    )
    with caplog.at_level(logging.ERROR, logger="mhpo.client"):
        for step in range(100):  # a time before 1970 is an error of the record itself, not of one item
            run.log(step, scalars(step), histograms={"log_ratio": histogram(step)}, time=-1.0 if step == 42 else None)
        report = run.finish(timeout=30)
    assert report.rejected_records == 1 and report.sent_records == 99 and report.spooled_records == 0
    assert sorted(shared_sqlite_server.stored_steps(run.id, "train/loss")) == [s for s in range(100) if s != 42]
    reasons = list((tmp_path / "rejected" / run.id).glob("*.reason.txt"))
    assert len(reasons) == 1 and "422" in reasons[0].read_text() and "time" in reasons[0].read_text()
    assert "refused 1 record(s)" in caplog.text


def test_resume_with_the_same_run_id_after_a_crash(shared_sqlite_server: Target, tmp_path: Path) -> None:
    target = shared_sqlite_server
    first = mhpo.init(PROJECT, "resumed", server=target.url, token=target.token, spool_dir=tmp_path, **FAST)
    for step in range(30):
        first.log(step, scalars(step))
    first.finish("crashed", timeout=30)
    again = mhpo.init(
        PROJECT, "resumed", server=target.url, token=target.token, spool_dir=tmp_path, run_id=first.id, **FAST
    )
    for step in range(25, 60):  # re-logs 25..29 from its last checkpoint: stored once
        again.log(step, scalars(step))
    assert again.finish(timeout=30).complete
    assert sorted(target.stored_steps(first.id, "train/loss")) == list(range(60))
    assert target.stored_run(first.id)["status"] == "finished"
    runs = target.get_json(f"/api/v1/runs?project={PROJECT}")["runs"]
    assert [r["run_id"] for r in runs if r["name"] == "resumed"] == [first.id]


CRASHING_TRAINER = """
import sys
import mhpo
run = mhpo.init(sys.argv[1], "no-finish", server=sys.argv[2], token=sys.argv[3], spool_dir=sys.argv[4],
                flush_interval=5.0)
print(run.id, flush=True)
for step in range(20):
    run.log(step, {"train/loss": 1.0})
raise RuntimeError("diverged")
"""


def test_exit_without_finish_flushes_and_marks_the_run_failed(shared_sqlite_server: Target, tmp_path: Path) -> None:
    target = shared_sqlite_server
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_TRAINER, PROJECT, target.url, str(target.token), str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "diverged" in done.stderr
    run_id = done.stdout.split()[0]
    assert sorted(target.stored_steps(run_id, "train/loss")) == list(range(20))
    assert target.stored_run(run_id)["status"] == "failed"


def test_a_damaged_spool_file_is_set_aside_not_retried_forever(shared_sqlite_server: Target, tmp_path: Path) -> None:
    orphan = str(uuid.uuid4())
    orphan_dir = tmp_path / server_key(shared_sqlite_server.url) / orphan
    orphan_dir.mkdir(parents=True)
    (orphan_dir / f"{1:020d}-{uuid.uuid4()}-n5.json").write_bytes(b'{"batch_id": "x", "records": [{"step": 0, "sca')
    run = mhpo.init(
        PROJECT,
        "replayer",
        server=shared_sqlite_server.url,
        token=shared_sqlite_server.token,
        spool_dir=tmp_path,
        **FAST,
    )
    assert run.finish(timeout=20).complete
    assert not orphan_dir.exists()
    assert len(list((tmp_path / "rejected" / orphan).glob("*-n5.json"))) == 1


def test_persist_delivers_what_was_logged_before_a_batch_is_due(shared_server: Target, tmp_path: Path) -> None:
    run = mhpo.init(
        PROJECT,
        "persist",
        server=shared_server.url,
        token=shared_server.token,
        spool_dir=tmp_path,
        flush_interval=3600.0,
    )
    for step in range(3):
        run.log(step, scalars(step))
    assert run.persist(timeout=60.0)
    assert shared_server.stored_steps(run.id, "train/loss") == [0, 1, 2]
    assert not run.spool.batches(run.id)
    run.finish()
