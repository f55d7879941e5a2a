"""Downsampled reads by series length, from the stored tiers and from every point; and what keeping the tiers costs ingest.

Reads: per database, one run per length (default 10,000, 100,000 and 1,000,000 steps) of one
key, written with the store's bulk write (batches of 10,000 steps); then the median of
`--repeat` reads of the whole key downsampled to 1,000 points:
- "points": every point aggregated in SQL, the read before the tiers (`tiers.TIERED_MIN_STEPS`
  set out of reach), in-process (`store.get_scalars`);
- "tiers": the same read merging the stored tiers, in-process;
- "HTTP": `GET /api/v1/runs/{id}/scalars?keys=x&max_points=1000` from `mhpo serve` on the same
  database (the tiers), what a dashboard waits for.

Ingest: `store.write_records` of 1 step x 30 keys and of 50 steps x 20 keys per batch (the
shapes of bench/ingest.py) to two runs in turn, batch for batch, one with the tier upkeep and
one without (the store's `TierUpkeep.after_write` replaced by a no-op); median points/s of
the rounds.

    python bench/reads.py                                   # SQLite and PostgreSQL (MHPO_TEST_PG_URL)
    python bench/reads.py --no-pg --sizes 10000 100000      # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from ingest import DEFAULT_PG_URL, pg_database
from servers import mhpo_server

import mhpo_migrations
from mhpo_server.schemas import RecordIn, RunCreate
from mhpo_server.store import SqlStore, open_store, tiers

SIZES = (10_000, 100_000, 1_000_000)
MAX_POINTS = 1_000
WRITE_STEPS = 10_000
STEP_KEYS = [f"k{i:02d}" for i in range(30)]
BATCH_STEPS, BATCH_KEYS = 50, [f"k{i:02d}" for i in range(20)]


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm: the first read pays for statement compilation and the page cache
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def build(store: SqlStore, steps: int) -> str:
    run_id = store.create_run(RunCreate(project="bench", name=f"read-{steps}")).run_id
    for first in range(0, steps, WRITE_STEPS):
        records = [
            RecordIn(step=s, time=1.7e9, scalars={"x": 1.0 / (s + 1) + (s % 97) * 1e-3})
            for s in range(first, min(first + WRITE_STEPS, steps))
        ]
        store.write_records(run_id, uuid.uuid4().hex, records)
    return run_id


@contextmanager
def tiers_out_of_reach() -> Iterator[None]:
    saved = tiers.TIERED_MIN_STEPS
    tiers.TIERED_MIN_STEPS = sys.maxsize
    try:
        yield
    finally:
        tiers.TIERED_MIN_STEPS = saved


def reads(name: str, url: str, sizes: list[int], repeat: int, workdir: Path) -> list[tuple[Any, ...]]:
    mhpo_migrations.upgrade(url)
    store = open_store(url)
    assert isinstance(store, SqlStore)
    rows = []
    try:
        runs = {}
        for steps in sizes:
            start = time.perf_counter()
            runs[steps] = build(store, steps)
            print(f"  {name}: wrote {steps:,} steps in {time.perf_counter() - start:.1f} s", flush=True)
        for steps, run_id in runs.items():

            def read(run_id: str = run_id) -> int:
                return len(store.get_scalars(run_id, ["x"], None, None, MAX_POINTS).series["x"].step)

            with tiers_out_of_reach():
                points_ms = median_ms(read, repeat)
            tiers_ms = median_ms(read, repeat)
            rows.append([name, steps, read(), points_ms, tiers_ms])
    finally:
        store.close()
    with mhpo_server(url, workdir) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        for row in rows:
            url_path = f"/api/v1/runs/{runs[row[1]]}/scalars"
            params = {"keys": "x", "max_points": MAX_POINTS}
            row.append(median_ms(lambda u=url_path, p=params: client.get(u, params=p).raise_for_status(), repeat))
    return [tuple(r) for r in rows]


def ingest(name: str, url: str, rounds: int, batches: int) -> list[tuple[Any, ...]]:
    """Points/s of write_records per batch shape, the tier upkeep on and off.

    Two runs written batch for batch in turn, one with the upkeep and one without, so both see
    the same load at the same moment; `rounds` pairs of fresh runs, the median of their rates.
    """
    mhpo_migrations.upgrade(url)
    store = open_store(url)
    assert isinstance(store, SqlStore)
    upkeep = store._tiers  # the store's tier upkeep; "off" swaps in one whose after_write does nothing
    off = SimpleNamespace(after_write=lambda *args, **kwargs: None)
    rates: dict[tuple[str, bool], list[float]] = {}
    try:
        for shape, steps, keys in (("1 step x 30 keys", 1, STEP_KEYS), ("50 steps x 20 keys", BATCH_STEPS, BATCH_KEYS)):
            for _ in range(rounds):
                runs = {on: store.create_run(RunCreate(project="bench", name="ingest")).run_id for on in (True, False)}
                spent = dict.fromkeys(runs, 0.0)
                for b in range(batches):
                    records = [
                        RecordIn(step=b * steps + s, time=1.7e9, scalars=dict.fromkeys(keys, s * 0.5))
                        for s in range(steps)
                    ]
                    for on in (True, False) if b % 2 else (False, True):  # who goes first alternates
                        run_id = runs[on]
                        store._tiers = upkeep if on else off
                        start = time.perf_counter()
                        store.write_records(run_id, uuid.uuid4().hex, records)
                        spent[on] += time.perf_counter() - start
                for on in runs:
                    rates.setdefault((shape, on), []).append(batches * steps * len(keys) / spent[on])
    finally:
        store._tiers = upkeep
        store.close()
    out = []
    for shape in dict.fromkeys(s for s, _ in rates):
        on, off = statistics.median(rates[(shape, True)]), statistics.median(rates[(shape, False)])
        out.append((name, shape, off, on, on / off - 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="series lengths in steps")
    parser.add_argument("--repeat", type=int, default=9, help="reads per cell (the median is shown)")
    parser.add_argument("--rounds", type=int, default=5, help="ingest rounds per setting (tiers on / off)")
    parser.add_argument("--batches", type=int, default=400, help="batches per ingest round")
    parser.add_argument("--pg", default=os.environ.get("MHPO_TEST_PG_URL", DEFAULT_PG_URL), help="PostgreSQL admin URL")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--no-ingest", action="store_true", help="skip the ingest cost of the tiers")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mhpo-bench-reads-"))
    targets = [("sqlite", lambda: nullcontext(f"sqlite:///{workdir / 'reads.db'}"))]
    if not args.no_pg:
        targets.append(("postgresql", lambda: pg_database(args.pg)))
    read_rows: list[tuple[Any, ...]] = []
    ingest_rows: list[tuple[Any, ...]] = []
    for name, database in targets:
        with database() as url:
            read_rows += reads(name, url, args.sizes, args.repeat, workdir)
        if not args.no_ingest:
            with database() if name != "sqlite" else nullcontext(f"sqlite:///{workdir / 'ingest.db'}") as url:
                ingest_rows += ingest(name, url, args.rounds, args.batches)
    print(f"\nOne key downsampled to {MAX_POINTS:,} points (median of {args.repeat} reads)")
    print("| database   |     steps | points returned | every point (before) | tiers (in-process) | tiers (HTTP) |")
    print("|------------|-----------|-----------------|----------------------|--------------------|--------------|")
    for name, steps, returned, points_ms, tiers_ms, http_ms in read_rows:
        print(
            f"| {name:<10} | {steps:>9,} | {returned:>15,} | {points_ms:>17.1f} ms | {tiers_ms:>15.1f} ms"
            f" | {http_ms:>9.1f} ms |"
        )
    if ingest_rows:
        print(
            f"\nIngest through store.write_records, points/s (median of {args.rounds} rounds of {args.batches} batches)"
        )
        print("| database   | batch              | tiers off | tiers on | on vs off |")
        print("|------------|--------------------|-----------|----------|-----------|")
        for name, shape, off, on, change in ingest_rows:
            print(f"| {name:<10} | {shape:<18} | {off:>9,.0f} | {on:>8,.0f} | {change:>+9.1%} |")


if __name__ == "__main__":
    main()
