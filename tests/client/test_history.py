"""Resume with a rewind, a rewind queued while the server is down, and partial refusal, through the client."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mhpo
from tests.client.conftest import PROJECT
from tests.client.helpers import Target
from tests.fixtures.server import LiveServer

FAST = {"flush_interval": 0.05, "max_backoff": 0.3}


def stored(target: Target, run_id: str, key: str = "value") -> dict[int, float]:
    series = target.get_json(f"/api/v1/runs/{run_id}/scalars?keys={key}&max_points=10000")["series"]
    return dict(zip(series[key]["step"], series[key]["value"], strict=True)) if key in series else {}


def crashed_run(target: Target, spool: Path) -> str:
    """Steps 0..150 with value = step, then the trainer dies (the run is left as it was)."""
    run = mhpo.init(PROJECT, "resume", server=target.url, token=target.token, spool_dir=spool, **FAST)
    for step in range(151):
        run.log(step, {"value": float(step)})
    assert run.flush(timeout=30)
    run.finish("crashed")
    return run.id


def test_resume_from_step_rewinds_before_logging(shared_server: Target, tmp_path: Path) -> None:
    run_id = crashed_run(shared_server, tmp_path)
    run = mhpo.init(
        PROJECT,
        "resume",
        server=shared_server.url,
        token=shared_server.token,
        spool_dir=tmp_path,
        run_id=run_id,
        resume_from_step=100,
        **FAST,
    )
    for step in range(101, 201):
        run.log(step, {"value": 1000.0 + step})
    report = run.finish(timeout=30)
    assert report.complete and report.duplicate_items == 0, report
    assert stored(shared_server, run_id) == {s: float(s) if s <= 100 else 1000.0 + s for s in range(201)}
    events = shared_server.get_json(f"/api/v1/runs/{run_id}/events")["events"]
    assert [(e["type"], e["step"], e["evidence"]["removed"]["scalars"]) for e in events] == [("rewind", 100, 50)]


def test_rewind_requested_while_the_server_is_down_is_replayed_in_order(
    live_server_db: LiveServer, tmp_path: Path
) -> None:
    target = Target(live_server_db)
    run_id = crashed_run(target, tmp_path)
    live_server_db.kill()
    run = mhpo.init(
        PROJECT, "resume", server=target.url, spool_dir=tmp_path, run_id=run_id, resume_from_step=100, **FAST
    )
    for step in range(101, 201):
        run.log(step, {"value": 1000.0 + step})
    assert not run.flush(timeout=0.5)  # the rewind and the records wait in the spool, in order
    spooled = sorted(p.name for p in run.spool_dir.iterdir() if p.name.endswith(".json"))
    assert spooled[0].endswith("-rewind.json") and len(spooled) >= 2
    live_server_db.start()
    report = run.finish(timeout=30)
    assert report.complete and report.duplicate_items == 0, report
    assert stored(target, run_id) == {s: float(s) if s <= 100 else 1000.0 + s for s in range(201)}


def test_partial_refusal_keeps_the_good_keys_and_warns_once_per_key(
    shared_server: Target, tmp_path: Path, caplog: object
) -> None:
    run = mhpo.init(PROJECT, "partial", server=shared_server.url, token=shared_server.token, spool_dir=tmp_path, **FAST)
    with caplog.at_level(logging.WARNING, logger="mhpo.client"):  # type: ignore[attr-defined]
        run.log(1, {"train/loss": 0.9, "": 2.0})
        assert run.flush(timeout=30)
        run.log(2, {"train/loss": 0.8, "": 3.0, "bad\x01key": 1.0, "caf\udce9": 4.0})
        report = run.finish(timeout=30)
    assert stored(shared_server, run.id, "train/loss") == {1: 0.9, 2: 0.8}
    assert report.rejected_items == 4 and report.rejected_records == 0 and not report.complete
    warnings = [r.getMessage() for r in caplog.records if "refused scalars" in r.getMessage()]  # type: ignore[attr-defined]
    assert len(warnings) == 3 and "''" in warnings[0] and "bad\\x01key" in warnings[1]
    kept = sorted((tmp_path / "rejected" / run.id).glob("*.json"))
    records = [r for path in kept for r in json.loads(path.read_text())["records"]]
    assert sorted((r["step"], sorted(r["scalars"])) for r in records) == [
        (1, [""]),
        (2, ["", "bad\x01key", "caf\udce9"]),
    ]
    assert [r["scalars"]["caf\udce9"] for r in records if r["step"] == 2] == [4.0]  # kept as sent, with its value
    reasons = [json.loads(line) for path in kept for line in path.with_suffix(".reason.txt").read_text().splitlines()]
    assert {(r["step"], r["key"]) for r in reasons} == {
        (1, ""),
        (2, ""),
        (2, "bad\x01key"),
        (2, "caf\ufffd\ufffd\ufffd"),
    }


def test_fork_then_continue_the_new_run(shared_server: Target, tmp_path: Path) -> None:
    parent = mhpo.init(
        PROJECT, "parent", server=shared_server.url, token=shared_server.token, spool_dir=tmp_path, **FAST
    )
    for step in range(51):
        parent.log(step, {"value": float(step)})
    assert parent.finish(timeout=30).complete
    child = mhpo.client.fork(parent.id, 20, name="child", server=shared_server.url, token=shared_server.token)
    assert (child["parent_run_id"], child["fork_step"], child["project"]) == (parent.id, 20, PROJECT)
    run = mhpo.init(
        child["project"],
        child["name"],
        server=shared_server.url,
        token=shared_server.token,
        spool_dir=tmp_path,
        run_id=child["run_id"],
        **FAST,
    )
    for step in range(21, 41):
        run.log(step, {"value": -float(step)})
    assert run.finish(timeout=30).complete
    assert stored(shared_server, run.id) == {s: float(s) if s <= 20 else -float(s) for s in range(41)}
    assert stored(shared_server, parent.id) == {s: float(s) for s in range(51)}
