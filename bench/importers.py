"""Import throughput of `mhpo import csv|tensorboard|mlflow` into SQLite, by source size.

Each source is written by its own library (the stdlib `csv` writer; torch's `SummaryWriter`, one
event per scalar as TRL, transformers and verl write them; the `mlflow` client into a file store),
`--keys` scalars per step, then imported through the records API into a fresh SQLite file:

- `--db`: the importer starts the service in its own process (what `mhpo import ... --db` does);
- `--server`: a separate `mhpo serve` process on its own SQLite file (what `--server URL` does).

A point is one (step, key, value) of the source; the server also stores the product key of every
mapped TRL / verl name, so it stores more items than the source has points (the default keys are
not mapped, so there the two are equal; `--trl-names` names the first keys as TRL logs them, so the
server's flags judge entropy, reward, loss and the rest as in a real import). Printed per cell:
points, reading and sending time (wall), points per second over both, and the CPU seconds of the
importing process and its reader processes (reading, sending and, with `--db`, the service itself;
with `--server` the server's own CPU is not counted), so a loaded machine's figures can be told
from the work done.

    python bench/importers.py                                 # CSV and TensorBoard, 100k and 500k points
    python bench/importers.py --steps 5000 --mlflow           # MLflow's file store too (slow to write)
    python bench/importers.py --steps 2000 10000 50000 --keys 20
    python bench/importers.py --tb-runs 4             # a logdir of 4 runs: read by 4 processes
    python bench/importers.py --trl-names             # keys named as TRL logs them: the flags judge them
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from servers import mhpo_server

from mhpo.importers import Writer, read_csv, read_logdir, read_tracking
from mhpo.importers._model import SourceRun
from mhpo.integrations.names import METRIC_NAMES

VERL_PREFIXES = ("actor/", "critic/", "response_length/", "rollout_corr/", "training/")  # the rest are TRL's


def value(step: int, i: int) -> float:
    """Key i's value at `step`: level and a small wobble, no trend, so under TRL names no flag state holds
    for the whole run (a state that holds is judged at every step: a different, rarer workload)."""
    return round(0.2 + 0.01 * i + 0.001 * ((37 * step + i) % 11), 6)


def write_csv(path: Path, steps: int, keys: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *keys])
        for step in range(steps):
            writer.writerow([step, *(value(step, i) for i in range(len(keys)))])
    return path


def write_tensorboard(logdir: Path, steps: int, keys: list[str], runs: int = 1) -> Path:
    """`runs` run directories sharing the `steps` between them."""
    from torch.utils.tensorboard import SummaryWriter

    for run in range(runs):
        with SummaryWriter(str(logdir / f"run{run}"), max_queue=10_000, flush_secs=600) as writer:
            for step in range(steps // runs):
                for i, key in enumerate(keys):
                    writer.add_scalar(key, value(step, i), step)
    return logdir


def write_mlflow(store: Path, steps: int, keys: list[str]) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.as_uri())
    run_id = client.create_run(client.create_experiment("bench")).info.run_id
    metrics = [Metric(k, value(s, i), 1_700_000_000_000 + s, s) for s in range(steps) for i, k in enumerate(keys)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    return store.as_uri()


@contextmanager
def destination(mode: str, workdir: Path) -> Any:
    if mode == "server":
        with mhpo_server(workdir=workdir) as url:
            yield url
    else:
        from mhpo_server.local import serving

        with serving(f"sqlite:///{workdir / 'mhpo.db'}") as url:
            yield url


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the reader processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(read: Callable[[], list[SourceRun]], mode: str, workdir: Path) -> dict[str, float]:
    with destination(mode, workdir) as url:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        runs = read()
        t1 = time.perf_counter()
        writer = Writer(url)
        try:
            stored = sum(writer.write(run).accepted for run in runs)
        finally:
            writer.close()
        t2, cpu1 = time.perf_counter(), cpu_seconds()
    points = sum(run.points for run in runs)
    return {"points": points, "stored": stored, "read": t1 - t0, "send": t2 - t1, "cpu": cpu1 - cpu0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5_000, 25_000], help="steps per source")
    parser.add_argument("--keys", type=int, default=20, help="scalars per step")
    parser.add_argument("--mode", choices=["db", "server", "both"], default="both")
    parser.add_argument("--mlflow", action="store_true", help="also an MLflow file store (slow to write)")
    parser.add_argument(
        "--tb-runs", type=int, default=1, help="TensorBoard run directories sharing the steps (read in parallel)"
    )
    parser.add_argument(
        "--trl-names",
        action="store_true",
        help="name the first keys as TRL logs them (loss, entropy, reward, ...): the server also stores their "
        "product keys and its flags judge them, as in a real import",
    )
    args = parser.parse_args()
    keys = [f"bench/k{i:02d}" for i in range(args.keys)]
    if args.trl_names:
        trl = [name for name in METRIC_NAMES if not name.startswith(VERL_PREFIXES)][: args.keys]
        keys = trl + keys[len(trl) :]
    mapped = sum(key in METRIC_NAMES for key in keys)
    modes = ["db", "server"] if args.mode == "both" else [args.mode]
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'source':<12} {'dest':<7} {'points':>9} {'read s':>7} {'send s':>7} {'points/s':>9} {'cpu s':>6}")
    for steps in args.steps:
        with tempfile.TemporaryDirectory(prefix="mhpo-bench-import-") as tmp:
            root = Path(tmp)
            sources: dict[str, Callable[[], list[SourceRun]]] = {}
            path = write_csv(root / "run.csv", steps, keys)
            sources["csv"] = lambda path=path: read_csv(path, project="bench")
            logdir = write_tensorboard(root / "tb", steps, keys, args.tb_runs)
            sources[f"tb-{args.tb_runs}-runs" if args.tb_runs > 1 else "tensorboard"] = lambda logdir=logdir: (
                read_logdir(logdir, project="bench")
            )
            if args.mlflow:
                uri = write_mlflow(root / "mlruns", steps, keys)
                sources["mlflow"] = lambda uri=uri: read_tracking(uri, project="bench")
            for name, read in sources.items():
                for mode in modes:
                    workdir = root / f"{name}-{mode}"
                    workdir.mkdir()
                    m = measure(read, mode, workdir)
                    assert m["stored"] == m["points"] * (len(keys) + mapped) // len(keys), m
                    total = m["read"] + m["send"]
                    print(
                        f"{name:<12} {mode:<7} {m['points']:>9,} {m['read']:>7.2f} {m['send']:>7.2f} "
                        f"{m['points'] / total:>9,.0f} {m['cpu']:>6.2f}",
                        flush=True,
                    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
