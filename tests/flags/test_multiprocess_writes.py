"""Several server processes on one database store exactly the flags and alerts of one process, through
both write paths (v1 records, MLflow log-batch), while batches of one run are judged on several
processes at once and while a rewind on one process races a batch on another.

The expected state is always well defined: a run's batches commit in step order (each client posts
its next batch only once the previous one is answered, and every client posts every batch, so a
batch stored by one process is a duplicate on the others), and a reference server (one process on a
database of its own) receives the batches that ended up stored, in that order, through the same
write path. Every test compares the flags and the fired alerts (rules on a scalar spike, a scalar
threshold and every flag, cooldown 0) with the reference's.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import pytest

from tests.conftest import fresh_pg_database
from tests.fixtures.server import LiveServer
from tests.flags.synthetic import Stream, generate_stream
from tests.flags.test_multiprocess import flags

WritePath = Literal["v1", "mlflow"]
Batch = tuple[int, int]  # steps [start, stop)
HISTORY_EVENTS = ("rewind", "fork")
RULES: tuple[dict[str, Any], ...] = (
    {"type": "spike", "key": "grad/norm", "direction": "up", "z": 8.0, "window_steps": 30, "min_baseline": 10},
    {"type": "threshold", "key": "policy/kl_k3", "op": ">", "value": 0.05, "for_steps": 2},
    {"type": "flag", "kind": "*", "min_severity": "info"},
)


@dataclass
class Cluster:
    """`shared`: server processes on one database; `single`: one process on a database of its own."""

    shared: list[LiveServer]
    single: LiveServer


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Four processes on one database and a reference process, started once for the module."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    with ExitStack() as stack:
        if request.param == "sqlite":
            shared_url, single_url = f"sqlite:///{tmp / 'shared.db'}", f"sqlite:///{tmp / 'single.db'}"
        else:
            shared_url, single_url = (stack.enter_context(fresh_pg_database()) for _ in range(2))
        servers = [stack.enter_context(LiveServer(shared_url, migrate=i == 0)) for i in range(4)]
        yield Cluster(servers, stack.enter_context(LiveServer(single_url)))


def project_with_rules(*urls: str) -> str:
    """A new project with the same alert rules on each database (cooldown 0: every firing is stored)."""
    project = f"p-{uuid.uuid4().hex[:8]}"
    for url in urls:
        for i, condition in enumerate(RULES):
            body = {"name": f"{condition['type']}-{i}", "project": project, "condition": condition, "cooldown_s": 0}
            r = httpx.post(f"{url}/api/v1/alert-rules", json=body, timeout=30)
            assert r.status_code == 201, r.text
    return project


def new_run(url: str, path: WritePath, project: str) -> str:
    name = f"run-{uuid.uuid4().hex[:6]}"
    if path == "v1":
        r = httpx.post(f"{url}/api/v1/runs", json={"project": project, "name": name}, timeout=30)
        assert r.status_code == 201, r.text
        return str(r.json()["run_id"])
    r = httpx.post(f"{url}/api/2.0/mlflow/runs/create", json={"experiment_id": project, "run_name": name}, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["run"]["info"]["run_id"])


def _double(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def post(url: str, path: WritePath, run_id: str, stream: Stream, batch: Batch, batch_id: str | None = None) -> None:
    """The steps of `batch` through the write path: one v1 records batch (`batch_id`, or a new one) or one
    MLflow log-batch (which has no batch id: a (key, step) stored before keeps its first value)."""
    records = stream.records(*batch)
    if path == "v1":
        body = json.dumps({"batch_id": batch_id or uuid.uuid4().hex, "records": records})  # NaN as the client sends it
        headers = {"content-type": "application/json"}
        r = httpx.post(f"{url}/api/v1/runs/{run_id}/records", content=body, headers=headers, timeout=60)
    else:
        metrics = [
            {"key": k, "value": _double(v), "timestamp": round(rec["time"] * 1000), "step": rec["step"]}
            for rec in records
            for k, v in rec["scalars"].items()
        ]
        r = httpx.post(f"{url}/api/2.0/mlflow/runs/log-batch", json={"run_id": run_id, "metrics": metrics}, timeout=60)
    assert r.status_code == 200, r.text


def last_step(url: str, run_id: str) -> int:
    r = httpx.get(f"{url}/api/v1/runs/{run_id}", timeout=30)
    assert r.status_code == 200, r.text
    found = r.json()["last_step"]
    return -1 if found is None else int(found)


def wait_stored(url: str, run_id: str, step: int) -> None:
    """Until the run's history reaches `step` (the batch is committed; its evaluation may still run)."""
    deadline = time.monotonic() + 60
    while last_step(url, run_id) < step:
        assert time.monotonic() < deadline, f"step {step} of run {run_id} was not stored within 60 s"
        time.sleep(0.002)


def flag_set(url: str, run_id: str) -> list[tuple[Any, ...]]:
    return [f for f in flags(url, run_id) if f[1] not in HISTORY_EVENTS]


def alert_set(url: str, run_id: str) -> list[tuple[Any, ...]]:
    """(rule, step, severity, message) of the fired alerts not taken out of the history by a rewind."""
    r = httpx.get(f"{url}/api/v1/alerts", params={"run_id": run_id, "limit": 10_000}, timeout=60)
    assert r.status_code == 200, r.text
    return sorted(
        (a["rule_name"], a["step"], a["severity"], a["message"]) for a in r.json()["alerts"] if a["rewound_at"] is None
    )


def batches_of(n_steps: int, size: int, first: int = 0) -> list[Batch]:
    """Steps [0, first) in batches of 40 (a baseline without events, under MLflow's 1,000 metrics a request),
    then batches of `size` steps: many small batches where flags are raised, so that consecutive
    evaluations have many chances to overlap."""
    head = [(start, min(start + 40, first)) for start in range(0, first, 40)]
    return head + [(start, min(start + size, n_steps)) for start in range(first, n_steps, size)]


def replicated(
    urls: list[str], path: WritePath, run_id: str, stream: Stream, batches: list[Batch], clients: int
) -> None:
    """`clients` threads each post every batch of the run in order, client c to server c mod N, as every
    rank of a job logging the same metrics does. A batch another process stored first is answered at once
    (nothing new), so that client's next batch is stored while the process that stored this one may still
    be evaluating it: batches commit in step order, their evaluations overlap across processes."""

    def client(c: int) -> None:
        for j, batch in enumerate(batches):
            post(urls[c % len(urls)], path, run_id, stream, batch, f"{run_id}-{j}")

    with ThreadPoolExecutor(clients) as pool:
        for done in [pool.submit(client, c) for c in range(clients)]:
            done.result()


def reference(url: str, path: WritePath, project: str, stream: Stream, batches: list[Batch]) -> str:
    """One process receiving `batches` one after the other: the flags and alerts every test expects."""
    run_id = new_run(url, path, project)
    for batch in batches:
        post(url, path, run_id, stream, batch)
    return run_id


def assert_same_monitoring(url: str, run_id: str, single: str, expected_run: str) -> None:
    got, expected = flag_set(url, run_id), flag_set(single, expected_run)
    assert got == expected, _difference("flags", got, expected)
    got_alerts, expected_alerts = alert_set(url, run_id), alert_set(single, expected_run)
    assert got_alerts == expected_alerts, _difference("alerts", got_alerts, expected_alerts)


def _difference(what: str, got: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> str:
    extra = [g[:3] for g in got if g not in expected]
    missing = [e[:3] for e in expected if e not in got]
    return f"{what} differ from one process's: {len(extra)} extra {extra[:10]}, {len(missing)} missing {missing[:10]}"


def refractory_duplicates(found: list[tuple[Any, ...]], kinds: tuple[str, ...], period: int) -> list[tuple[Any, ...]]:
    """Warning and critical flags of a refractory kind less than `period` steps after one of that kind and severity."""
    out: list[tuple[Any, ...]] = []
    last: dict[tuple[str, str], int] = {}
    for step, kind, severity, *_ in found:
        if severity == "info":
            continue
        if kind in kinds and (kind, severity) in last and step - last[kind, severity] < period:
            out.append((step, kind, severity))
        last[kind, severity] = step
    return out


PATHS = ["v1", "mlflow"]


def collapse_stream() -> Stream:
    """160 steps: a collapse flagged at steps 85 (warning) and 87 (critical), then held for 200 steps."""
    stream = generate_stream(5, 160, "collapse", onset=80)
    stream.scalars["grad/norm"][40] *= 40.0
    stream.scalars["policy/kl_k3"][120:] *= 100.0
    stream.scalars["train/loss"][100] = math.nan
    return stream


@pytest.mark.parametrize("path", PATHS)
def test_concurrent_batches_of_one_run_on_two_processes_flag_once_per_refractory_period(
    cluster: Cluster, path: WritePath
) -> None:
    """Several clients post one run's steps to two processes at once: no flag twice inside its refractory
    period, and exactly the flags and alerts of one process receiving the same history."""
    a, b = cluster.shared[:2]
    project = project_with_rules(a.url, cluster.single.url)
    stream, batches = collapse_stream(), batches_of(160, 2, first=76)
    runs = [new_run(a.url, path, project) for _ in range(3)]
    with ThreadPoolExecutor(len(runs)) as pool:
        for done in [pool.submit(replicated, [a.url, b.url], path, r, stream, batches, 2) for r in runs]:
            done.result()
    expected = reference(cluster.single.url, path, project, stream, batches)
    found = flag_set(cluster.single.url, expected)
    assert any(kind == "collapse" for _, kind, *_ in found)
    assert refractory_duplicates(found, ("collapse", "trust_region"), 200) == []
    for run_id in runs:
        got = flag_set(b.url, run_id)
        assert refractory_duplicates(got, ("collapse", "trust_region"), 200) == []
        assert_same_monitoring(b.url, run_id, cluster.single.url, expected)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("path", PATHS)
def test_n_processes_store_the_flags_and_alerts_of_one(cluster: Cluster, path: WritePath, n: int) -> None:
    """Two runs, each posted by N clients, every batch of a run spread over the N processes."""
    servers = [s.url for s in cluster.shared[:n]]
    project = project_with_rules(servers[0], cluster.single.url)
    streams = [collapse_stream(), generate_stream(11, 120, "erosion", onset=60)]
    streams[1].scalars["grad/norm"][50] *= 40.0
    streams[1].scalars["policy/kl_k3"][90:93] *= 100.0
    runs = [new_run(servers[i % n], path, project) for i in range(len(streams))]
    jobs = [(r, s, batches_of(s.n_steps, 3, first)) for r, s, first in zip(runs, streams, (76, 44), strict=True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for done in [pool.submit(replicated, servers, path, r, s, bs, n) for r, s, bs in jobs]:
            done.result()
    for run_id, stream, batches in jobs:
        expected = reference(cluster.single.url, path, project, stream, batches)
        assert len(flag_set(cluster.single.url, expected)) >= 3
        assert alert_set(cluster.single.url, expected)
        for url in servers:
            assert_same_monitoring(url, run_id, cluster.single.url, expected)


REWIND_TO = 25


def pre_rewind_stream(seed: int) -> Stream:
    """60 steps with a flag (and so an alert) in every batch of 5 after the rewind point."""
    stream = generate_stream(seed, 60)
    for step in (27, 31, 34, 38, 41, 47, 52, 58):
        stream.scalars["train/loss"][step] = math.nan
    for step in (29, 44):
        stream.scalars["grad/norm"][step] *= 40.0
    stream.scalars["policy/kl_k3"][36:40] *= 100.0
    return stream


def stored_steps(url: str, run_id: str) -> set[int]:
    r = httpx.get(
        f"{url}/api/2.0/mlflow/metrics/get-history", params={"run_id": run_id, "metric_key": "grad/norm"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return {int(m["step"]) for m in r.json()["metrics"]}


def race_rewind(a: str, b: str, path: WritePath, run_id: str, stream: Stream, batches: list[Batch]) -> int:
    """Stream the batches to `a` in order; once step 34 is stored (its evaluation likely running), rewind
    the run to step 25 on `b`; the stream stops when the rewind is answered (the batch in flight ends).
    Returns how many flags the rewind removed."""
    rewound = threading.Event()
    removed: list[int] = []

    def rewind() -> None:
        wait_stored(b, run_id, 34)
        r = httpx.post(f"{b}/api/v1/runs/{run_id}/rewind", json={"step": REWIND_TO}, timeout=60)
        assert r.status_code == 200, r.text
        removed.append(int(r.json()["removed"]["flags"]))
        rewound.set()

    rewinder = threading.Thread(target=rewind)
    rewinder.start()
    try:
        for batch in batches:
            if rewound.is_set():
                break
            post(a, path, run_id, stream, batch)
    finally:
        rewinder.join(60)
    assert rewound.is_set(), "the rewind did not complete"
    return removed[0]


@pytest.mark.parametrize("path", PATHS)
def test_a_rewind_racing_a_batch_on_another_process_leaves_no_flag_of_rewound_data(
    cluster: Cluster, path: WritePath
) -> None:
    """Process A ingests while process B rewinds the run to step 25 mid-stream. Afterwards the run holds
    steps 0-25 plus the batches stored after the rewind (those answered after it), and its flags and
    un-rewound alerts are exactly those of one process receiving that history: none left from rewound data."""
    a, b = cluster.shared[:2]
    project = project_with_rules(a.url, cluster.single.url)
    streams = [pre_rewind_stream(seed) for seed in (21, 22, 23)]
    batches = batches_of(60, 5)
    runs = [new_run(a.url, path, project) for _ in streams]
    with ThreadPoolExecutor(len(runs)) as pool:
        jobs = [pool.submit(race_rewind, a.url, b.url, path, r, s, batches) for r, s in zip(runs, streams, strict=True)]
        removed = [job.result() for job in jobs]
    assert any(removed), "no rewind found flags of the steps it removed: nothing was raced"
    for run_id, stream in zip(runs, streams, strict=True):
        kept = stored_steps(a.url, run_id)
        later = sorted(s for s in kept if s > REWIND_TO)
        assert set(range(REWIND_TO + 1)) <= kept
        history = [bt for bt in batches if bt[1] <= REWIND_TO] + [(REWIND_TO, REWIND_TO + 1)]
        history += [bt for bt in batches if bt[0] > REWIND_TO and bt[0] in later]
        assert sorted(s for bt in history for s in range(*bt)) == sorted(kept), "a batch was stored in part"
        left = [
            item
            for url in (a.url, b.url)
            for item in [*flag_set(url, run_id), *((s, n) for n, s, *_ in alert_set(url, run_id))]
            if item[0] > REWIND_TO and item[0] not in kept
        ]
        assert left == [], f"flags and alerts of rewound steps outlived the rewind to step {REWIND_TO}"
        expected = reference(cluster.single.url, path, project, stream, history)
        assert_same_monitoring(a.url, run_id, cluster.single.url, expected)
        assert_same_monitoring(b.url, run_id, cluster.single.url, expected)
