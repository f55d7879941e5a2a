"""The client with no server at all: log() stays fast and never raises, the spool keeps every step."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mhpo
from bench import servers
from mhpo.client import MHPOClientError
from mhpo.client._sender import Outcome, classify
from mhpo.client._spool import Spool
from tests.fixtures.server import free_port

FAST = {"flush_interval": 0.05, "max_backoff": 0.2}


@pytest.fixture
def dead_server() -> str:
    """A loopback URL nothing listens on: connection refused, as with a crashed server."""
    return f"http://127.0.0.1:{free_port()}"


def spooled_steps(run_dir: Path) -> list[int]:
    steps = []
    for path in sorted(run_dir.glob("*-n*.json")):
        steps += [r["step"] for r in json.loads(path.read_bytes())["records"]]
    return steps


def test_public_api_is_exported() -> None:
    assert mhpo.init is mhpo.client.init
    assert mhpo.Run is mhpo.client.Run
    assert {"Run", "init"} <= set(mhpo.__all__)


def test_server_down_every_step_is_spooled_and_reported(dead_server: str, tmp_path: Path) -> None:
    run = mhpo.init("p", "offline", server=dead_server, spool_dir=tmp_path, **FAST)
    nan_inf = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")}
    for step in range(300):
        run.log(step, {"loss": 1.0 / (step + 1), **nan_inf})
    report = run.finish(timeout=0.5)

    assert report.spooled_records == 300 and report.spooled_batches >= 1
    assert not report.status_delivered and not report.complete
    assert report.dropped_records == 0 and report.rejected_records == 0
    assert sorted(spooled_steps(report.spool_dir)) == list(range(300))
    assert json.loads((report.spool_dir / "run.json").read_text())["run_id"] == run.id
    assert json.loads((report.spool_dir / "status.json").read_text()) == {"status": "finished"}
    body = next(report.spool_dir.glob("*-n*.json")).read_text()
    assert "NaN" in body and "-Infinity" in body  # non-finite values are kept, as the server stores them
    assert not list(report.spool_dir.glob(".tmp-*"))


@pytest.fixture
def stalled_server() -> Iterator[str]:
    with servers.stalled_server() as url:
        yield url


@pytest.mark.timeout(120)  # a log() that waited on the stalled request (1 s each) would take 2,000 s
def test_log_never_waits_on_the_network(stalled_server: str, tmp_path: Path) -> None:
    """The sender thread is stuck in a request the server never answers; 2,000 log() calls return anyway
    and every step reaches the spool. Its latency is measured in bench/client_log.py."""
    run = mhpo.init("p", "latency", server=stalled_server, spool_dir=tmp_path, request_timeout=1.0, **FAST)
    for step in range(2000):
        run.log(step, {f"k{i}": float(i) for i in range(30)})
    report = run.finish(timeout=0.5)
    assert report.spooled_records == 2000 and report.dropped_records == 0
    assert sorted(spooled_steps(report.spool_dir)) == list(range(2000))


def test_full_spool_warns_and_counts_instead_of_crashing(
    dead_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = mhpo.init("p", "full", server=dead_server, spool_dir=tmp_path, spool_max_bytes=20_000, batch_size=50, **FAST)
    with caplog.at_level(logging.WARNING, logger="mhpo.client"):
        for step in range(1000):
            run.log(step, {f"key/{i}": float(i) for i in range(10)})
        report = run.finish(timeout=0.5)
    assert report.dropped_records > 0
    assert report.spooled_records + report.dropped_records == 1000
    assert "spool full" in caplog.text and "MHPO_SPOOL_MAX_BYTES" in caplog.text
    used = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert used <= 20_000 + 1_000  # the bound, plus the small run/status metadata


def test_bad_arguments_raise_at_the_call(dead_server: str, tmp_path: Path) -> None:
    run = mhpo.init("p", "args", server=dead_server, spool_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="step=-1"):
        run.log(-1, {"a": 1.0})
    with pytest.raises(ValueError, match="step='3'"):
        run.log("3", {"a": 1.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"scalars\['a'\]"):
        run.log(0, {"a": "high"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="status='done'"):
        run.finish("done")
    run.finish(timeout=0.2)
    with pytest.raises(ValueError, match="project="):
        mhpo.init("", "x", server=dead_server, spool_dir=tmp_path)
    with pytest.raises(ValueError, match="run_id='run-7'"):
        mhpo.init("p", "x", server=dead_server, spool_dir=tmp_path, run_id="run-7")
    with pytest.raises(ValueError, match="config="):
        mhpo.init("p", "x", server=dead_server, spool_dir=tmp_path, config={"model": object()})


def test_an_unserialisable_record_is_dropped_alone(dead_server: str, tmp_path: Path) -> None:
    run = mhpo.init("p", "json", server=dead_server, spool_dir=tmp_path, **FAST)
    run.log(0, {"a": 1.0})
    run.log(1, {"a": 1.0}, histograms={"h": {"lo": 0.0, "hi": 1.0, "counts": object()}})
    run.log(2, {"a": 1.0})
    report = run.finish(timeout=0.3)
    assert report.dropped_records == 1
    assert sorted(spooled_steps(report.spool_dir)) == [0, 2]


def test_one_run_id_is_open_in_one_place_only(
    dead_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mhpo.client._run, "LOCK_WAIT_S", 0.3)
    run = mhpo.init("p", "lock", server=dead_server, spool_dir=tmp_path, **FAST)
    with pytest.raises(MHPOClientError, match="already open"):
        mhpo.init("p", "lock", server=dead_server, spool_dir=tmp_path, run_id=run.id)
    run.finish(timeout=0.2)
    again = mhpo.init("p", "lock", server=dead_server, spool_dir=tmp_path, run_id=run.id, **FAST)
    assert again.id == run.id
    again.finish(timeout=0.2)


def test_log_from_many_threads(dead_server: str, tmp_path: Path) -> None:
    import threading

    run = mhpo.init("p", "threads", server=dead_server, spool_dir=tmp_path, **FAST)

    def worker(offset: int) -> None:
        for i in range(250):
            run.log(offset * 1000 + i, {"a": float(i)})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = run.finish(timeout=0.5)
    assert sorted(spooled_steps(report.spool_dir)) == sorted(k * 1000 + i for k in range(8) for i in range(250))


def test_spool_env_and_stale_partial_writes(dead_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MHPO_SPOOL_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("MHPO_SERVER", dead_server)
    run = mhpo.init("p", "env", **FAST)
    assert run.server == dead_server
    assert run.spool_dir.is_relative_to(tmp_path / "from-env")
    run.finish(timeout=0.2)
    stale = run.spool_dir / ".tmp-00000000000000000001-x-n1.json"
    stale.write_bytes(b'{"batch_id": "cut sho')
    lock = Spool(tmp_path / "from-env", dead_server, 1 << 20).lock(run.id)
    assert lock is not None
    lock.release()
    assert not stale.exists()


@pytest.mark.parametrize(
    ("status", "n", "outcome"),
    [
        (200, 5, Outcome.OK),
        (408, 5, Outcome.RETRY),
        (429, 5, Outcome.RETRY),
        (503, 5, Outcome.RETRY),
        (404, 5, Outcome.MISSING_RUN),
        (422, 5, Outcome.SPLIT),
        (413, 2, Outcome.SPLIT),
        (422, 1, Outcome.REJECT),
        (401, 5, Outcome.REJECT),
        (403, 5, Outcome.REJECT),
    ],
)
def test_response_classes(status: int, n: int, outcome: Outcome) -> None:
    assert classify(status, n) is outcome


def test_persist_puts_every_logged_step_in_the_spool_without_waiting_for_the_server(
    dead_server: str, tmp_path: Path
) -> None:
    """What a checkpoint waits for: the steps are on disk, though the server is down and no batch was due."""
    run = mhpo.init("p", "persist", server=dead_server, spool_dir=tmp_path, flush_interval=3600.0, max_backoff=3600.0)
    for step in range(5):
        run.log(step, {"loss": float(step)})
    started = time.monotonic()
    assert run.persist(timeout=60.0)
    assert time.monotonic() - started < 30.0  # one refused connection, not the timeout or a back-off
    assert sorted(spooled_steps(run.spool_dir)) == list(range(5))
    run.finish(timeout=0.1)
