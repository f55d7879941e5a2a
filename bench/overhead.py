"""Streaming overhead of the trainer: step time with streaming on and off, interleaved.

Two trainers with the same config and seed train the tiny model side by side; steps
alternate (on, off, off, on, ...) so machine noise hits both alike. "on" streams every
optimizer step to a real `mhpo serve` (temporary SQLite) through the client; "off" computes
the same diagnostics but sends nothing (the server shares the machine, so its ingest work
counts as overhead here). The headline is the median over pairs of adjacent steps of
on/off step time, which cancels slow drifts in machine load; the goal is <= 3 % overhead.

    python bench/overhead.py                 # 40 rollout steps per trainer
    python bench/overhead.py --steps 15      # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from servers import free_port

from mhpo.demo import start_server
from mhpo.trainer import Trainer, TrainerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="rollout steps per trainer (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mhpo-overhead-"))
    os.environ.setdefault("MHPO_SPOOL_DIR", str(tmp / "spool"))
    port = free_port()
    server = start_server(f"sqlite:///{tmp / 'bench.db'}", port)
    try:
        common = {"steps": args.steps + args.warmup, "progress": False, "seed": 0, "project": "bench", "lr": 5e-4}
        on = Trainer(TrainerConfig(stream=True, server=f"http://127.0.0.1:{port}", name="stream-on", **common))
        off = Trainer(TrainerConfig(stream=False, name="stream-off", **common))
        times: dict[str, list[float]] = {"on": [], "off": []}
        # generate() samples from the global torch RNG: give each trainer its own stream, so both
        # draw the same completions and do exactly the same work apart from streaming
        rng = {"on": torch.get_rng_state(), "off": torch.get_rng_state()}
        for i in range(args.steps + args.warmup):
            order = [("on", on), ("off", off)] if i % 2 == 0 else [("off", off), ("on", on)]
            for label, trainer in order:
                torch.set_rng_state(rng[label])
                start = time.perf_counter()
                trainer.step()
                if i >= args.warmup:
                    times[label].append(time.perf_counter() - start)
                rng[label] = torch.get_rng_state()
        start = time.perf_counter()
        on.close()
        flush_s = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=15)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = {k: sum(v) for k, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["on"], times["off"], strict=True))
    print(f"rollout steps timed per trainer: {args.steps} (each = 1 rollout + 2 optimizer steps, 2 records)")
    print(f"{'':12}{'median s':>10}{'total s':>10}")
    for k in ("off", "on"):
        print(f"{'stream ' + k:12}{med[k]:10.4f}{total[k]:10.2f}")
    print(
        f"overhead: median of paired step ratios {100 * (paired - 1):+.2f} %, ratio of medians "
        f"{100 * (med['on'] / med['off'] - 1):+.2f} %, ratio of totals {100 * (total['on'] / total['off'] - 1):+.2f} % "
        f"(goal <= 3 %); final flush at finish {flush_s:.2f} s"
    )


if __name__ == "__main__":
    main()
