"""Latency of `Run.log()` in the training loop: a live server, a server that is down, one that stalls.

`log()` only appends to the client's buffer; the sender thread does the HTTP, so a dead or stuck
server must not show in the trainer's step. Each case logs `--steps` steps of 30 scalars and
prints the median and 99th percentile of one call. Goal: median <= 100 us, p99 <= 1 ms in
every case. Baseline in the same run: building the step's dict of 30 scalars, the least a
trainer pays to log anything.

    python bench/client_log.py
    python bench/client_log.py --steps 20000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from servers import free_port, mhpo_server, stalled_server

import mhpo

KEYS = [f"k{i:02d}" for i in range(30)]


def percentiles(call: Callable[[int], object], steps: int) -> tuple[float, float]:
    """Median and 99th percentile of `call(step)`, in microseconds."""
    durations = []
    for step in range(steps):
        start = time.perf_counter()
        call(step)
        durations.append(time.perf_counter() - start)
    cuts = statistics.quantiles(durations, n=100)
    return cuts[49] * 1e6, cuts[98] * 1e6


def log_latency(server: str, steps: int, spool: Path) -> tuple[float, float]:
    run = mhpo.init("bench", "client-log", server=server, spool_dir=spool, request_timeout=2.0)
    try:
        return percentiles(lambda step: run.log(step, dict.fromkeys(KEYS, step * 0.5)), steps)
    finally:
        run.finish(timeout=5.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="log() calls per case")
    args = parser.parse_args(argv)
    spool = Path(tempfile.mkdtemp(prefix="mhpo-bench-spool-"))
    rows = [("baseline: the step's dict alone", percentiles(lambda step: dict.fromkeys(KEYS, step * 0.5), args.steps))]
    with mhpo_server() as url:
        rows.append(("log(), live server", log_latency(url, args.steps, spool)))
    rows.append(("log(), server down (refused)", log_latency(f"http://127.0.0.1:{free_port()}", args.steps, spool)))
    with stalled_server() as url:
        rows.append(("log(), server stalled", log_latency(url, args.steps, spool)))
    print(f"| case | median us | p99 us |  ({args.steps} steps of {len(KEYS)} scalars each)")
    print("|---|---|---|")
    for name, (p50, p99) in rows:
        print(f"| {name} | {p50:.1f} | {p99:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
