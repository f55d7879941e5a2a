"""Must show: 16 clients write at once for a bounded time; 0 errors, 0 lost.

Each client is a `Run` with its own sender thread and keep-alive connection, logging from its
own thread, as 16 trainers (or 16 ranks) would.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mhpo
from mhpo.client import FinishReport, Run
from tests.client.conftest import PROJECT
from tests.client.helpers import Target

CLIENTS = 16
SECONDS = 5.0


def test_sixteen_clients_at_once_lose_nothing(shared_server: Target, tmp_path: Path) -> None:
    runs = [
        mhpo.init(
            PROJECT,
            f"concurrent-{i}",
            server=shared_server.url,
            token=shared_server.token,
            spool_dir=tmp_path,
            flush_interval=0.2,
        )
        for i in range(CLIENTS)
    ]
    steps = [0] * CLIENTS
    reports: list[FinishReport | None] = [None] * CLIENTS
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def client(i: int, run: Run) -> None:
        try:
            start.wait()
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                step = steps[i]
                run.log(step, {"train/loss": 1.0 / (step + 1), **{f"ratio/k{k}": step + k * 0.5 for k in range(9)}})
                steps[i] = step + 1
                time.sleep(0.005)
            reports[i] = run.finish(timeout=90)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, run)) for i, run in enumerate(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, errors
    for i, (run, report) in enumerate(zip(runs, reports, strict=True)):
        assert report is not None and report.complete, report
        assert report.sent_records == steps[i] > 0 and report.dropped_records == report.rejected_records == 0
        assert sorted(shared_server.stored_steps(run.id, "ratio/k8")) == list(range(steps[i]))
    assert "Traceback" not in shared_server.server.log()
    print(f"{CLIENTS} clients, {SECONDS:.0f} s: {sum(steps)} steps, {sum(steps) * 10} points, all stored once")
