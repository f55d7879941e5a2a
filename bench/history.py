"""Cost of a rewind and of a fork against the store, by history length (SQLite, and PostgreSQL if reachable).

A run gets `--steps` steps of `--keys` scalars and one 64-bin histogram per step, written in
batches of 500 steps; then it is rewound to half its steps, and the rewound run is forked at
a quarter (the fork copies that history). Wall seconds per operation are printed.

    python bench/history.py                          # 20,000 steps x 30 keys, SQLite and PostgreSQL
    python bench/history.py --steps 5000 --no-pg     # quicker, SQLite only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

import mhpo_migrations
from mhpo_server.schemas import RecordIn, RunCreate
from mhpo_server.store import open_store

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def records(start: int, stop: int, keys: int) -> list[RecordIn]:
    hist = {"lo": -2.0, "hi": 2.0, "counts": [1] * 64}
    return [
        RecordIn.model_validate(
            {
                "step": s,
                "time": 1.7e9 + s,
                "histograms": {"h": hist},
                "scalars": {f"k{i:02d}": float(s + i) for i in range(keys)},
            }
        )
        for s in range(start, stop)
    ]


def measure(url: str, steps: int, keys: int) -> dict[str, float]:
    mhpo_migrations.upgrade(url)
    store = open_store(url)
    try:
        run_id = store.create_run(RunCreate(project="bench", name="history")).run_id
        for start in range(0, steps, 500):
            store.write_records(run_id, uuid.uuid4().hex, records(start, min(start + 500, steps), keys))
        t0 = time.perf_counter()
        store.rewind(run_id, steps // 2 - 1)
        t1 = time.perf_counter()
        store.fork(run_id, steps // 4 - 1, "fork")
        t2 = time.perf_counter()
        store.rewind(run_id, steps // 2 - 1)  # repeated: nothing to remove
        t3 = time.perf_counter()
    finally:
        store.close()
    return {"rewind": t1 - t0, "fork": t2 - t1, "repeat rewind": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=30)
    parser.add_argument("--no-pg", action="store_true")
    args = parser.parse_args()
    targets = [("sqlite", f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}")]
    admin = os.environ.get("MHPO_TEST_PG_URL", DEFAULT_PG_URL)
    pg_db = f"mhpo_bench_{uuid.uuid4().hex[:8]}"
    if not args.no_pg:
        with psycopg.connect(admin.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_db}"')
        targets.append(("postgresql", f"{admin.rsplit('/', 1)[0]}/{pg_db}"))
    try:
        print(f"{args.steps} steps x {args.keys} scalars + 1 histogram; rewind removes half, fork copies a quarter")
        for name, url in targets:
            found = measure(url, args.steps, args.keys)
            print(f"{name:<11}" + "  ".join(f"{op} {sec:.3f} s" for op, sec in found.items()))
    finally:
        if not args.no_pg:
            with psycopg.connect(admin.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
