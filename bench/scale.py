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
from contextlib import ExitStack
from dataclasses import asdict

from ingest import DEFAULT_PG_URL, Cell, MHPOTarget, ingest, pg_database
from servers import mhpo_server

MODES = {"1 step/req": False, "1000 pts/req": True}


def measure(n: int, admin_url: str, per_server: int, seconds: float) -> list[Cell]:
    """N servers on a fresh database; both request shapes, each on runs of its own."""
    cells = []
    with ExitStack() as stack:
        db_url = stack.enter_context(pg_database(admin_url))
        urls = [stack.enter_context(mhpo_server(db_url)) for _ in range(n)]
        target = MHPOTarget(urls[0])  # adds bench/ingest.py's alert rules to the project
        for mode, batched in MODES.items():
            points, requests, errors, elapsed = ingest(target, urls, batched, per_server * n, seconds)
            cell = Cell("mhpo", "postgresql", mode, per_server * n, points, requests, errors, elapsed, servers=n)
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
