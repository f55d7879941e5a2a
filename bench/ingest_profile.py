"""Where one ingest request's server time goes, in process (no HTTP): parse, judge, store, turn.

A run of the bench's project (the same alert rules as `bench/ingest.py`) gets `--requests`
batches through the server's ingest service, as the records route calls it; each phase is
timed with `time.perf_counter` around the functions that do it:

- parse: the request body into `RecordsIn` (pydantic, JSON included)
- judge: the flags and alert rules on the batch (`IngestMonitor.prejudge` / `evaluate`)
- store: the write transaction(s), commit included (`Store.write_records`, `commit_evaluation`)
- turn: waiting for and taking the run's cross-process turn (`Store.run_turn`), when taken
- rest: the ingest service's own bookkeeping

    python bench/ingest_profile.py                       # SQLite, 1 step (30 scalars) and 1,000 points per request
    python bench/ingest_profile.py --db postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ingest import BATCH_KEYS, BATCH_STEPS, BENCH_RULES, STEP_KEYS, pg_database

import mhpo_migrations
from mhpo_server.alerts.schemas import AlertRuleCreate
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.schemas import RecordsIn, RunCreate

PHASES = ("parse", "judge", "store", "turn", "rest")


def body(n: int, batched: bool) -> bytes:
    now = time.time()
    if batched:
        records = [
            {"step": n * BATCH_STEPS + s, "time": now, "scalars": dict.fromkeys(BATCH_KEYS, s * 0.5)}
            for s in range(BATCH_STEPS)
        ]
    else:
        records = [{"step": n, "time": now, "scalars": dict.fromkeys(STEP_KEYS, n * 0.5)}]
    return json.dumps({"batch_id": str(uuid.uuid4()), "records": records}).encode()


class Timer:
    """Seconds per phase; a phase inside another (a read inside judging) counts for the outer one only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[phase] += time.perf_counter() - start

        return timed

    def wrap_context(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[None]:
            start = time.perf_counter()
            manager = fn(*args, **kwargs)
            manager.__enter__()
            self.seconds[phase] += time.perf_counter() - start
            try:
                yield
            finally:
                start = time.perf_counter()
                manager.__exit__(None, None, None)
                self.seconds[phase] += time.perf_counter() - start

        return timed


def profile(db_url: str, batched: bool, requests: int) -> dict[str, float]:
    """Milliseconds per request by phase (and "total")."""
    mhpo_migrations.upgrade(db_url)
    app = create_app(Settings(db=db_url, auth=False, dashboard=False))
    ingest, store = app.state.ingest, app.state.store
    for rule in BENCH_RULES:
        app.state.alert_store.create_rule(AlertRuleCreate.model_validate({"project": "bench", **rule}))
    run_id = store.create_run(RunCreate(project="bench", name=f"profile-{uuid.uuid4().hex[:6]}")).run_id
    bodies = [body(n, batched) for n in range(requests + 20)]
    for raw in bodies[:20]:  # warm-up: caches filled, statements compiled
        batch = RecordsIn.model_validate_json(raw)
        ingest.write(run_id, batch.batch_id, batch.records, batch.rejected_items)

    timer = Timer()
    monitor = ingest.monitor
    monitor.prejudge = timer.wrap("judge", monitor.prejudge)
    monitor.evaluate = timer.wrap("judge", monitor.evaluate)
    monitor.evaluate_stored = timer.wrap("judge", monitor.evaluate_stored)
    store.write_records = timer.wrap("store", store.write_records)
    store.commit_evaluation = timer.wrap("store", store.commit_evaluation)
    store.run_turn = timer.wrap_context("turn", store.run_turn)
    parse = timer.wrap("parse", RecordsIn.model_validate_json)
    start = time.perf_counter()
    for raw in bodies[20:]:
        batch = parse(raw)
        ingest.write(run_id, batch.batch_id, batch.records, batch.rejected_items)
    total = time.perf_counter() - start
    store.close()
    out = {phase: timer.seconds[phase] / requests * 1000 for phase in PHASES if phase != "rest"}
    out["rest"] = total / requests * 1000 - sum(out.values())
    out["total"] = total / requests * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="a PostgreSQL admin URL (a fresh database is made); default: a new SQLite file")
    parser.add_argument("--requests", type=int, default=2000, help="requests of one step; a tenth as many of 1,000")
    args = parser.parse_args(argv)
    print(f"| request | {' | '.join(PHASES)} | total ms | points/s |")
    print(f"|---|{'---|' * len(PHASES)}---|---|")
    for batched in (False, True):
        requests = args.requests // 10 if batched else args.requests
        if args.db:
            with pg_database(args.db) as url:
                ms = profile(url, batched, requests)
        else:
            url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='mhpo-profile-')) / 'mhpo.db'}"
            ms = profile(url, batched, requests)
        points = len(BATCH_KEYS) * BATCH_STEPS if batched else len(STEP_KEYS)
        cells = " | ".join(f"{ms[p]:.3f}" for p in PHASES)
        label = "1000 pts/req" if batched else "1 step/req"
        print(f"| {label} | {cells} | {ms['total']:.3f} | {points / ms['total'] * 1000:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
