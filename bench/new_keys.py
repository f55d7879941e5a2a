"""Cost of never-seen scalar keys in the flags listener (the detectors and alert rules run on ingest).

A run gets one batch of `--keys` new keys at one step (as one large MLflow or v1 batch makes
them), after a few steps of the keys the detectors read; the listener is timed on that
batch alone, in process, on a fresh SQLite file (or `--db`), and the cost per new key printed.
Then a scalars read of that run without `keys=` is timed: with more keys than
MHPO_MAX_KEYS_PER_READ it is refused (422) after reading at most that many key names.

    python bench/new_keys.py                  # 20,000 new keys
    python bench/new_keys.py --keys 100000 --db postgresql+psycopg://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

import mhpo_migrations
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.schemas import RecordIn, RunCreate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20_000, help="new keys in the timed batch")
    parser.add_argument("--db", default=None, help="database URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'bench.db'}"
        mhpo_migrations.upgrade(url)
        app = create_app(Settings(db=url, auth=False, dashboard=False))
        store, monitor = app.state.store, app.state.flag_monitor
        run = store.create_run(RunCreate(project="bench", name="new-keys"))
        warm = [RecordIn(step=s, scalars={"policy/entropy": 1.0, "reward/mean": 0.5}) for s in range(5)]
        monitor(store, run.run_id, store.write_records(run.run_id, "warm", warm).new_records)
        per = 10_000  # keys one record may carry: the batch holds as many records of step 5 as it takes
        batch = [
            RecordIn(step=5, scalars={f"custom/key_{i:06d}": float(i) for i in range(lo, min(lo + per, args.keys))})
            for lo in range(0, args.keys, per)
        ]
        new = store.write_records(run.run_id, "wide", batch).new_records
        start = time.perf_counter()
        monitor(store, run.run_id, new)
        seconds = time.perf_counter() - start
        print(f"{args.keys} new keys: listener {seconds:.3f} s, {seconds / args.keys * 1e3:.4f} ms per key")
        with TestClient(app) as client:
            start = time.perf_counter()
            answer = client.get(f"/api/v1/runs/{run.run_id}/scalars")
            seconds = time.perf_counter() - start
        print(f"scalars read without keys= on {args.keys + 2} keys: HTTP {answer.status_code} in {seconds:.3f} s")


if __name__ == "__main__":
    main()
