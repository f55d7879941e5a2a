"""Ingest throughput against the number of `mhpo serve` processes on one PostgreSQL database.

For each N, a fresh PostgreSQL database, N server processes on it (each `mhpo serve`, as
replicas behind a load balancer would be), and `--clients-per-server` client threads per
server, each on its own keep-alive connection and its own run, the clients spread evenly over
the servers. Flags are on (the server's default) and bench/ingest.py's alert rules watch the
project (on keys every request logs), so every batch is judged. Every cell runs
for `--seconds` and counts the points the servers acknowledged (2xx); the request bodies are
bench/ingest.py's: "1 step/req" is one step of 30 scalars, "1000 pts/req" 50 steps x 20 scalars.

    python bench/scale.py                          # N = 1, 2, 4 (MHPO_TEST_PG_URL or a local server)
    python bench/scale.py --servers 1 2 --seconds 3 --json scale.json

Every process (servers, PostgreSQL, this client) shares the machine's cores: the curve says how
far more processes help on this machine, printed with its CPU count; beyond the cores, processes
only take turns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import httpx
from ingest import DEFAULT_PG_URL, MHPOTarget, pg_database
from servers import mhpo_server

MODES = {"1 step/req": False, "1000 pts/req": True}


@dataclass
class Cell:
    servers: int
    mode: str
    clients: int
    points: int
    requests: int
    errors: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.points / self.seconds


def ingest(
    target: MHPOTarget, urls: list[str], batched: bool, per_server: int, seconds: float
) -> tuple[int, int, int, float]:
    """`per_server` client threads on each server, each its own connection and run, sending for `seconds`."""
    clients = [urls[i % len(urls)] for i in range(per_server * len(urls))]
    totals = [[0, 0, 0] for _ in clients]
    stop_at = [0.0]
    barrier = threading.Barrier(len(clients) + 1, action=lambda: stop_at.__setitem__(0, time.monotonic() + seconds))

    def worker(i: int) -> None:
        with httpx.Client(base_url=clients[i], timeout=60.0, headers={"Content-Type": "application/json"}) as client:
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

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.monotonic()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    return sum(t[0] for t in totals), sum(t[1] for t in totals), sum(t[2] for t in totals), elapsed


def measure(n: int, admin_url: str, per_server: int, seconds: float) -> list[Cell]:
    """N servers on a fresh database; both request shapes, each on runs of its own."""
    cells = []
    with ExitStack() as stack:
        db_url = stack.enter_context(pg_database(admin_url))
        urls = [stack.enter_context(mhpo_server(db_url)) for _ in range(n)]
        target = MHPOTarget(urls[0])  # adds bench/ingest.py's alert rules to the project
        for mode, batched in MODES.items():
            points, requests, errors, elapsed = ingest(target, urls, batched, per_server, seconds)
            cell = Cell(n, mode, per_server * n, points, requests, errors, elapsed)
            cells.append(cell)
            print(
                f"  {n} server(s) {mode:<13} {cell.clients:>2} clients: {cell.rate:>10,.0f} points/s ({errors} errors)",
                flush=True,
            )
    return cells


def print_table(cells: list[Cell]) -> None:
    counts = sorted({c.servers for c in cells})
    base = {c.mode: c.rate for c in cells if c.servers == counts[0]}
    print(f"\n{'servers':>7} {'clients':>7} " + "".join(f"{m + ' (points/s)':>26}" for m in MODES))
    for n in counts:
        row = {c.mode: c for c in cells if c.servers == n}
        clients = next(iter(row.values())).clients
        parts = [f"{row[m].rate:>14,.0f} ({row[m].rate / base[m]:.2f}x)" if m in row else " " * 26 for m in MODES]
        print(f"{n:>7} {clients:>7} " + "".join(f"{p:>26}" for p in parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4], help="the values of N")
    parser.add_argument("--clients-per-server", type=int, default=4, help="client threads per server process")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each cell")
    parser.add_argument("--json", help="also write the cells to this file")
    args = parser.parse_args(argv)
    admin_url = os.environ.get("MHPO_TEST_PG_URL", DEFAULT_PG_URL)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load:.1f}; PostgreSQL at {admin_url.rsplit('@', 1)[-1]}", flush=True)
    cells = [cell for n in args.servers for cell in measure(n, admin_url, args.clients_per_server, args.seconds)]
    print_table(cells)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"cpus": os.cpu_count(), "cells": [{**asdict(c), "points_per_s": c.rate} for c in cells]}, out, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
