"""Two server processes on one database flag a run exactly as one process does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

import mhpo_migrations
from mhpo.demo import wait_healthy
from mhpo_server.store.sql import SqlStore
from tests.conftest import fresh_pg_database
from tests.fixtures.server import REPO_ROOT, LiveServer, free_port
from tests.flags.synthetic import Stream, generate_stream


def stream_with_events() -> Stream:
    stream = generate_stream(5, 360, "collapse", onset=200)
    stream.scalars["grad/norm"][120] *= 40.0
    stream.scalars["policy/kl_k3"][250:] *= 100.0
    stream.scalars["train/loss"][300] = math.nan
    return stream


def new_run(url: str) -> str:
    r = httpx.post(f"{url}/api/v1/runs", json={"project": "p", "name": f"run-{uuid.uuid4().hex[:6]}"})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


def post(url: str, run_id: str, records: list[dict[str, Any]]) -> None:
    body = json.dumps({"batch_id": uuid.uuid4().hex, "records": records})
    r = httpx.post(
        f"{url}/api/v1/runs/{run_id}/records", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == 200, r.text


def flags(url: str, run_id: str) -> list[tuple[Any, ...]]:
    found = httpx.get(f"{url}/api/v1/runs/{run_id}/events", timeout=60).json()["events"]
    return sorted(
        (e["step"], e["kind"], e["severity"], e["detector"], e["message"], json.dumps(e["evidence"], sort_keys=True))
        for e in found
        if e["type"] == "flag"
    )


@pytest.mark.postgres
def test_two_processes_ingesting_alternately_give_the_flags_of_one() -> None:
    stream = stream_with_events()
    batches = [(start, min(start + 12, 360)) for start in range(0, 360, 12)]
    with (
        fresh_pg_database() as shared,
        fresh_pg_database() as alone,
        LiveServer(shared) as a,
        LiveServer(shared) as b,
        LiveServer(alone) as single,
    ):
        two, one = new_run(a.url), new_run(single.url)
        for i, (start, stop) in enumerate(batches):
            post((a, b)[i % 2].url, two, stream.records(start, stop))
            post(single.url, one, stream.records(start, stop))
        got, expected = flags(a.url, two), flags(single.url, one)
        assert got == expected
        assert flags(b.url, two) == expected
        kinds = {(step, kind) for step, kind, *_ in expected}
        assert {(120, "grad_spike"), (250, "kl_spike"), (300, "non_finite")} <= kinds
        assert any(kind == "collapse" for _, kind, *_ in expected)


@pytest.mark.postgres
def test_serve_with_workers_gives_the_flags_of_one_process() -> None:
    """`mhpo serve --workers 2`: each request may land on either worker (a new connection per request)."""
    stream = stream_with_events()
    with fresh_pg_database() as shared, fresh_pg_database() as alone:
        mhpo_migrations.upgrade(shared)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mhpo", "serve", "--db", shared, "--port", str(port), "--workers", "2"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(f"{url}/healthz", proc, timeout=120)
                with LiveServer(alone) as single:
                    two, one = new_run(url), new_run(single.url)
                    for start in range(0, 360, 20):
                        post(url, two, stream.records(start, start + 20))
                        post(single.url, one, stream.records(start, start + 20))
                    assert flags(url, two) == flags(single.url, one)
            finally:
                proc.terminate()
                proc.wait(timeout=30)


def assert_turns_are_exclusive_per_run(first: SqlStore, second: SqlStore) -> None:
    """While `first` holds a run's turn, `second` waits for that run, not for another run."""
    run, other = str(uuid.uuid4()), str(uuid.uuid4())
    while uuid.UUID(other).int % 64 == uuid.UUID(run).int % 64:  # SQLite stripes its lock files by run id
        other = str(uuid.uuid4())
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with first.run_turn(run):
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(30)
    with second.run_turn(other):
        pass  # another run: no wait
    waited: list[float] = []

    def wait_for_turn() -> None:
        t0 = time.monotonic()
        with second.run_turn(run):
            waited.append(time.monotonic() - t0)

    waiter = threading.Thread(target=wait_for_turn)
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not waited, "the second process got the run's turn while the first held it"
    release.set()
    holder.join(30)
    waiter.join(30)
    assert len(waited) == 1 and waited[0] >= 1.0
    with first.run_turn(run):
        pass  # released: taken again at once


def test_a_runs_turn_is_held_across_processes(db_url: str) -> None:
    """Two stores with their own engines, as two server processes have, on one database (SQLite, PostgreSQL)."""
    first, second = SqlStore.from_url(db_url), SqlStore.from_url(db_url)
    try:
        assert_turns_are_exclusive_per_run(first, second)
    finally:
        first.close()
        second.close()
