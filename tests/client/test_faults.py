"""Must show: a server killed with SIGKILL mid-run loses nothing, and a spool outlives the trainer process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import mhpo
from tests.client.helpers import Target, histogram, scalars
from tests.fixtures.server import REPO_ROOT, LiveServer

STEPS = 1000
SCHEDSTAT = Path("/proc/thread-self/schedstat")
KILL_AT, RESTART_AT = 300, 700


def run_queue_wait() -> float:
    """Seconds this thread has spent runnable but not running (another process had the CPU); 0 off Linux."""
    try:
        return int(SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def test_sigkill_mid_run_every_step_arrives_exactly_once(sqlite_url: str, tmp_path: Path) -> None:
    """Also: log() stays under a millisecond while the server is down.

    The bound is on the p99 of the wall time, and on the maximum of the wall time less the
    time the kernel kept this thread waiting for a CPU (/proc/thread-self/schedstat): on a
    shared, overloaded machine another process can preempt any 10 us call for milliseconds,
    which says nothing about log(). Waiting for a lock, the GIL or I/O still counts.
    """
    server = LiveServer(sqlite_url).start()
    restart_errors: list[BaseException] = []

    def restart_server() -> None:
        try:
            server.start()
        except BaseException as exc:
            restart_errors.append(exc)

    restart = threading.Thread(target=restart_server)
    outage: list[float] = []
    preempted: list[float] = []
    try:
        run = mhpo.init(
            "faults", "sigkill", server=server.url, spool_dir=tmp_path, flush_interval=0.05, max_backoff=0.5
        )
        for step in range(STEPS):
            if step == KILL_AT:
                server.kill()
            elif step == RESTART_AT:
                restart.start()  # the trainer keeps logging while the server boots
            values, hist = scalars(step), {"log_ratio": histogram(step)}
            queued_before = run_queue_wait()
            start = time.perf_counter()
            run.log(step, values, histograms=hist)
            elapsed = time.perf_counter() - start
            if KILL_AT <= step < RESTART_AT:
                outage.append(elapsed)
                preempted.append(run_queue_wait() - queued_before)
            time.sleep(0.003)
        restart.join()
        assert not restart_errors, restart_errors
        report = run.finish(timeout=60)

        assert report.complete, report
        assert report.replayed_batches > 0, "the outage should have gone through the spool"
        target = Target(server)
        assert sorted(target.stored_steps(run.id, "train/loss")) == list(range(STEPS))
        assert sorted(target.stored_steps(run.id, "ratio/k28")) == list(range(STEPS))
        hist = target.get_json(f"/api/v1/runs/{run.id}/histograms/log_ratio?max_steps={STEPS}")
        assert hist["step"] == list(range(STEPS)) and hist["step_end"] == list(range(STEPS))
        assert hist["counts"][KILL_AT + 1] == histogram(KILL_AT + 1)["counts"]
        assert target.stored_run(run.id)["status"] == "finished"
        assert not list(tmp_path.rglob("*-n*.json")), "nothing may be left in the spool"
    finally:
        if restart.is_alive():
            restart.join()
        server.stop()

    own = sorted(wall - queued for wall, queued in zip(outage, preempted, strict=True))
    outage.sort()
    p99, worst, own_worst = outage[int(len(outage) * 0.99)], outage[-1], own[-1]
    summary = (
        f"log() while the server was down, {len(outage)} calls: p50 {outage[len(outage) // 2] * 1e6:.0f} us, "
        f"p99 {p99 * 1e6:.0f} us, max {worst * 1e6:.0f} us; max without OS run-queue waits {own_worst * 1e6:.0f} us"
    )
    print(summary)
    assert p99 < 1e-3 and own_worst < 1e-3, summary


TRAINER = """
import json, sys
import mhpo
url, spool, name, steps, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
run = mhpo.init("faults", name, server=url, spool_dir=spool, flush_interval=0.05, max_backoff=0.3)
for step in range(steps):
    run.log(step, {"train/loss": 1.0 / (step + 1)})
report = run.finish(timeout=timeout)
print(json.dumps({"run_id": run.id, "spooled": report.spooled_records, "replayed": report.replayed_batches,
                  "complete": report.complete}))
"""


def trainer(url: str, spool: Path, name: str, steps: int, timeout: float) -> dict[str, object]:
    """One training process, start to exit."""
    done = subprocess.run(
        [sys.executable, "-c", TRAINER, url, str(spool), name, str(steps), str(timeout)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_spool_survives_the_trainer_process(sqlite_url: str, tmp_path: Path) -> None:
    server = LiveServer(sqlite_url)  # not started: the first trainer runs during an outage
    first = trainer(server.url, tmp_path, "offline", 300, timeout=0.5)
    assert first["spooled"] == 300 and not first["complete"]
    assert list(tmp_path.rglob("*-n*.json"))
    with server:
        second = trainer(server.url, tmp_path, "next", 10, timeout=30)
        assert second["complete"] and int(second["replayed"]) >= 1, second
        target = Target(server)
        assert sorted(target.stored_steps(str(first["run_id"]), "train/loss")) == list(range(300))
        assert target.stored_run(str(first["run_id"]))["status"] == "finished"
        assert sorted(target.stored_steps(str(second["run_id"]), "train/loss")) == list(range(10))
    assert not list(tmp_path.rglob("*.json")), "the replayed spool is cleared"
