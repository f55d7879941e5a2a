"""Ingest throughput and read latency of the MHPO server, next to an MLflow tracking server.

Both servers run on this machine in this run, each in its own process; clients speak raw
HTTP over keep-alive connections (httpx), one connection per client thread, one run per
client. Every cell runs for `--seconds` and counts the points the server acknowledged
(2xx). Scalars only: one point is one (step, key, value).

- "1 step/req": one step of 30 scalars per request (a trainer without batching).
- "1000 pts/req": 50 steps x 20 scalars per request (MLflow's log-batch maximum is 1,000 metrics).
- read: a 100,000-step series; MHPO downsampled to 1,000 points on the server (min/max kept),
  MLflow's full history (it has no downsampling).

    python bench/ingest.py                       # SQLite and PostgreSQL (MHPO_TEST_PG_URL), MLflow on SQLite
    python bench/ingest.py --repeat 3            # the README's figures: median of three rounds
    python bench/ingest.py --seconds 3 --no-pg   # quicker, SQLite only
    python bench/ingest.py --detector-keys       # keys the flags read, so every point is judged

All servers run for the whole bench and the cells are interleaved (MLflow, MHPO on SQLite,
MHPO on PostgreSQL, then the next cell), so each comparison shares the machine's load. The
cells start once the machine is idle after the servers' start (MLflow's job consumers keep
both cores of a 2-core machine busy for about a minute after its health check answers).

MLflow is a bench-only dependency: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from servers import free_port, mhpo_server, serve, wait_quiet

from mhpo_server.monitoring.params import DEFAULT_PARAMS, UPDATES_PER_ROLLOUT

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STEP_KEYS = [f"bench/k{i:02d}" for i in range(30)]
BATCH_STEPS, BATCH_KEYS = 50, [f"bench/k{i:02d}" for i in range(20)]
READ_STEPS = 100_000
# `--detector-keys`: the keys the flags read (a trainer of this package logs most of them), those
# that place a step in its rollout first; `bench/k00` and `bench/k01` stay for the alert rules.
STEP_KIND = ["train/rollout", "train/update_index", "tokens/valid"]
DETECTOR_KEYS = STEP_KIND + sorted(DEFAULT_PARAMS.keys() - set(STEP_KIND))


@dataclass(frozen=True)
class Workload:
    """The keys of one request and each point's value.

    The default keys (`bench/kNN`) are read by no detector, so the flags skip them (a key with
    finite values that no detector or rule names is not judged); with `detector_keys` every key
    but the two the alert rules watch is one the flags judge at every step.
    """

    detector_keys: bool = False

    def keys(self, batched: bool) -> list[str]:
        plain = BATCH_KEYS if batched else STEP_KEYS
        if not self.detector_keys:
            return plain
        return plain[:2] + DETECTOR_KEYS[: len(plain) - 2]

    def steps(self, n: int, batched: bool) -> range:
        """The steps of request number n of a run."""
        return range(n * BATCH_STEPS, (n + 1) * BATCH_STEPS) if batched else range(n, n + 1)

    def value(self, key: str, index: int, step: int) -> float:
        """`bench/kNN`: a ramp. Detector keys: a level with a small wobble and no trend (a healthy run)."""
        if key.startswith("bench/"):
            return step * 0.5
        if key == "train/rollout":
            return float(step // UPDATES_PER_ROLLOUT)
        if key == "train/update_index":
            return float(step % UPDATES_PER_ROLLOUT)
        if key == "tokens/valid":
            return 4096.0
        return round(0.2 + 0.01 * index + 0.001 * ((37 * step + index) % 11), 6)


@contextmanager
def mlflow_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--default-artifact-root",
        str(workdir / "mlflow-artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with serve(cmd, f"http://127.0.0.1:{port}/health", workdir / "mlflow-server.log"):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for the bench, dropped afterwards."""
    import psycopg

    name = f"mhpo_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Target:
    """One server's API: make a run, and the body of the n-th request of a run."""

    def new_run(self, client: httpx.Client) -> str:
        raise NotImplementedError

    def request(self, run_id: str, n: int, batched: bool) -> tuple[str, bytes, int]:
        """(path, JSON body, points) of request number n."""
        raise NotImplementedError


# Alert rules of the bench's project: the server evaluates them, with the flags, on every batch.
BENCH_RULES = [
    {"name": "k00 high", "condition": {"type": "threshold", "key": "bench/k00", "op": ">", "value": 1e12}},
    {"name": "k01 spike", "condition": {"type": "spike", "key": "bench/k01", "direction": "both"}},
    {"name": "any warning flag", "condition": {"type": "flag", "min_severity": "warning"}},
]


class MHPOTarget(Target):
    def __init__(self, base_url: str, rules: bool = True, workload: Workload = Workload()) -> None:
        self.workload = workload
        with httpx.Client(base_url=base_url) as client:
            for rule in BENCH_RULES if rules else ():
                client.post("/api/v1/alert-rules", json={"project": "bench", **rule}).raise_for_status()

    def new_run(self, client: httpx.Client) -> str:
        response = client.post("/api/v1/runs", json={"project": "bench", "name": f"ingest-{uuid.uuid4().hex[:6]}"})
        response.raise_for_status()
        return str(response.json()["run_id"])

    def request(self, run_id: str, n: int, batched: bool) -> tuple[str, bytes, int]:
        now = time.time()
        keys = self.workload.keys(batched)
        steps = self.workload.steps(n, batched)
        records = [
            {"step": step, "time": now, "scalars": {k: self.workload.value(k, i, step) for i, k in enumerate(keys)}}
            for step in steps
        ]
        body = json.dumps({"batch_id": str(uuid.uuid4()), "records": records}).encode()
        return f"/api/v1/runs/{run_id}/records", body, len(steps) * len(keys)


class MLflowTarget(Target):
    def __init__(self, base_url: str, workload: Workload = Workload()) -> None:
        self.workload = workload
        with httpx.Client(base_url=base_url) as client:
            response = client.post("/api/2.0/mlflow/experiments/create", json={"name": f"bench-{uuid.uuid4().hex[:8]}"})
            response.raise_for_status()
            self.experiment_id = response.json()["experiment_id"]

    def new_run(self, client: httpx.Client) -> str:
        response = client.post(
            "/api/2.0/mlflow/runs/create",
            json={"experiment_id": self.experiment_id, "start_time": int(time.time() * 1000)},
        )
        response.raise_for_status()
        return str(response.json()["run"]["info"]["run_id"])

    def request(self, run_id: str, n: int, batched: bool) -> tuple[str, bytes, int]:
        ts = int(time.time() * 1000)
        keys = self.workload.keys(batched)
        steps = self.workload.steps(n, batched)
        metrics = [
            {"key": k, "value": self.workload.value(k, i, step), "timestamp": ts, "step": step}
            for step in steps
            for i, k in enumerate(keys)
        ]
        body = json.dumps({"run_id": run_id, "metrics": metrics}).encode()
        return "/api/2.0/mlflow/runs/log-batch", body, len(metrics)


@dataclass
class Cell:
    server: str
    db: str
    mode: str
    clients: int
    points: int
    requests: int
    errors: int
    seconds: float
    servers: int = 1  # server processes taking the clients (bench/scale.py)

    @property
    def rate(self) -> float:
        return self.points / self.seconds


def ingest(
    target: Target, base_url: str | list[str], batched: bool, clients: int, seconds: float
) -> tuple[int, int, int, float]:
    """`clients` threads, each its own keep-alive connection and run, sending for `seconds`
    (to one server, or spread evenly over several); (points, requests, errors, seconds)."""
    urls = [base_url] if isinstance(base_url, str) else base_url
    totals = [[0, 0, 0] for _ in range(clients)]
    stop_at = [0.0]
    barrier = threading.Barrier(clients + 1, action=lambda: stop_at.__setitem__(0, time.monotonic() + seconds))

    def worker(i: int) -> None:
        url = urls[i % len(urls)]
        with httpx.Client(base_url=url, timeout=60.0, headers={"Content-Type": "application/json"}) as client:
            run_id = target.new_run(client)
            barrier.wait()
            n = 0
            while time.monotonic() < stop_at[0]:
                path, body, points = target.request(run_id, n, batched)
                response = client.post(path, content=body)
                totals[i][1] += 1
                if response.status_code == 200:
                    totals[i][0] += points
                else:
                    totals[i][2] += 1
                n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.monotonic()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    return sum(t[0] for t in totals), sum(t[1] for t in totals), sum(t[2] for t in totals), elapsed


def run_round(servers: list[tuple[str, str, Target, str]], seconds: float, cells: list[Cell]) -> None:
    """Every cell once, the servers interleaved per cell so each comparison shares the machine's load."""
    for batched in (False, True):
        for clients in (1, 8):
            for name, db, target, base_url in servers:
                points, requests, errors, elapsed = ingest(target, base_url, batched, clients, seconds)
                mode = "1000 pts/req" if batched else "1 step/req"
                cell = Cell(name, db, mode, clients, points, requests, errors, elapsed)
                cells.append(cell)
                print(
                    f"  {name:<7} {db:<10} {mode:<13} {clients} client(s): {cell.rate:>10,.0f} points/s"
                    f" ({errors} errors)",
                    flush=True,
                )


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def mhpo_read(base_url: str, steps: int) -> tuple[float, int]:
    """Median latency of a downsampled read of a `steps`-long series, and the points it returned."""
    with httpx.Client(base_url=base_url, timeout=120.0) as client:
        run_id = MHPOTarget(base_url, rules=False).new_run(client)
        for start in range(0, steps, 10_000):
            records = [
                {"step": s, "scalars": {"loss": 1.0 / (s + 1)}} for s in range(start, min(start + 10_000, steps))
            ]
            client.post(
                f"/api/v1/runs/{run_id}/records", json={"batch_id": str(uuid.uuid4()), "records": records}
            ).raise_for_status()
        params = {"keys": "loss", "max_points": 1000}
        url = f"/api/v1/runs/{run_id}/scalars"
        first = client.get(url, params=params)
        first.raise_for_status()
        returned = len(first.json()["series"]["loss"]["step"])
        times = timed(lambda: client.get(url, params=params).raise_for_status(), 10)
    return statistics.median(times), returned


def mlflow_read(base_url: str, steps: int) -> tuple[float, int]:
    """Median latency of reading MLflow's full history of a `steps`-long series (all pages)."""
    target = MLflowTarget(base_url)
    with httpx.Client(base_url=base_url, timeout=300.0) as client:
        run_id = target.new_run(client)
        ts = int(time.time() * 1000)
        for start in range(0, steps, 1000):
            metrics = [
                {"key": "loss", "value": 1.0 / (s + 1), "timestamp": ts, "step": s}
                for s in range(start, min(start + 1000, steps))
            ]
            client.post(
                "/api/2.0/mlflow/runs/log-batch", json={"run_id": run_id, "metrics": metrics}
            ).raise_for_status()

        def read() -> int:
            count, token = 0, None
            while True:
                params = {"run_id": run_id, "metric_key": "loss", "max_results": 25_000}
                if token:
                    params["page_token"] = token
                response = client.get("/api/2.0/mlflow/metrics/get-history", params=params)
                response.raise_for_status()
                answer = response.json()
                count += len(answer.get("metrics", []))
                token = answer.get("next_page_token")
                if not token:
                    return count

        returned = read()
        times = timed(read, 3)
    return statistics.median(times), returned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each ingest cell")
    parser.add_argument(
        "--pg",
        default=os.environ.get("MHPO_TEST_PG_URL", DEFAULT_PG_URL),
        help="PostgreSQL admin URL (a fresh database is created and dropped)",
    )
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-mlflow", action="store_true", help="skip the MLflow baseline")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all cells; the table shows each cell's median")
    parser.add_argument("--read-steps", type=int, default=READ_STEPS, help="length of the series read back")
    parser.add_argument(
        "--workers", type=int, default=1, help="`mhpo serve --workers N` (MLflow's server runs its default 4)"
    )
    parser.add_argument(
        "--detector-keys",
        action="store_true",
        help="name the keys as the flags read them (policy/entropy, ratio/clip_frac, ...): every point is judged",
    )
    args = parser.parse_args(argv)
    workload = Workload(detector_keys=args.detector_keys)

    workdir = Path(tempfile.mkdtemp(prefix="mhpo-bench-"))
    cells: list[Cell] = []
    reads: dict[str, tuple[float, int]] = {}
    try:
        with ExitStack() as stack:
            servers = [
                (
                    "mhpo",
                    "sqlite",
                    stack.enter_context(mhpo_server(f"sqlite:///{workdir / 'mhpo.db'}", workdir, workers=args.workers)),
                )
            ]
            if not args.no_pg:
                db_url = stack.enter_context(pg_database(args.pg))
                servers.append(
                    ("mhpo", "postgresql", stack.enter_context(mhpo_server(db_url, workdir, workers=args.workers)))
                )
            if not args.no_mlflow:
                base_url = stack.enter_context(mlflow_server(workdir))
                servers.insert(0, ("mlflow", "sqlite", base_url))
            targets: list[tuple[str, str, Target, str]] = [
                (name, db, MLflowTarget(url, workload) if name == "mlflow" else MHPOTarget(url, workload=workload), url)
                for name, db, url in servers
            ]
            print(f"  waited {wait_quiet():.0f} s for the servers' start-up work to end", flush=True)
            for _name, _db, target, base_url in targets:  # warm-up: first requests pay for imports and caches
                ingest(target, base_url, batched=True, clients=1, seconds=1.0)
            for _ in range(args.repeat):
                run_round(targets, args.seconds, cells)
            for name, db, base_url in servers:
                read = mlflow_read if name == "mlflow" else mhpo_read
                reads[f"{name}/{db}"] = read(base_url, args.read_steps)
                print(
                    f"  {name:<7} {db:<10} read {args.read_steps:,} steps -> {reads[f'{name}/{db}'][1]:,} points:"
                    f" {reads[f'{name}/{db}'][0] * 1000:.1f} ms",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_tables(cells, reads, args.read_steps)
    return 1 if any(c.errors for c in cells) else 0


def print_tables(cells: list[Cell], reads: dict[str, tuple[float, int]], read_steps: int) -> None:
    groups: dict[tuple[str, str, str, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.server, c.db, c.mode, c.clients), []).append(c)
    rate = {key: statistics.median(c.rate for c in group) for key, group in groups.items()}
    print("\nIngest (scalar points per second, median of the rounds, higher is better)")
    print(
        f"| {'server':<7} | {'database':<10} | {'request':<13} | clients | {'points/s':>10} | {'vs MLflow':>9} | errors |"
    )
    print(f"|{'-' * 9}|{'-' * 12}|{'-' * 15}|---------|{'-' * 12}|{'-' * 11}|--------|")
    for key, group in groups.items():
        server, db, mode, clients = key
        base = rate.get(("mlflow", "sqlite", mode, clients))
        ratio = f"{rate[key] / base:.1f}x" if base else "-"
        errors = sum(c.errors for c in group)
        print(
            f"| {server:<7} | {db:<10} | {mode:<13} | {clients:>7} | {rate[key]:>10,.0f} | {ratio:>9} | {errors:>6} |"
        )
    print(f"\nRead a {read_steps:,}-step series (median)")
    print(f"| {'server/database':<18} | {'points returned':>15} | {'latency':>10} |")
    print(f"|{'-' * 20}|{'-' * 17}|{'-' * 12}|")
    for name, (seconds, returned) in reads.items():
        print(f"| {name:<18} | {returned:>15,} | {seconds * 1000:>7.1f} ms |")


if __name__ == "__main__":
    sys.exit(main())
