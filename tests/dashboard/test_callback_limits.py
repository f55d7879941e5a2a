"""What one viewer's request can cost the server, and what a failing read shows, through Dash's own endpoint.

A real `mhpo serve` (its dashboard mounted at /), called as the browser's renderer calls it:
the threads of the server process are counted while a comparison of many runs is asked for,
and callbacks given an empty run state or runs the API does not know answer 200 with a
message for the page, never a 500.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from mhpo_dashboard.api import MAX_PARALLEL_READS, parallel
from mhpo_server.config import Settings
from tests.dashboard.callbacks import call, route
from tests.dashboard.seeding import seed_run
from tests.fixtures.server import LiveServer

LIMIT = 200  # this server's MHPO_DASHBOARD_MAX_COMPARE_RUNS (the documented default is 20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("limits") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}", env={"MHPO_DASHBOARD_MAX_COMPARE_RUNS": str(LIMIT)}) as live:
        yield live


@pytest.fixture(scope="module")
def run_id(server: LiveServer) -> str:
    return seed_run(server.url, "p", "seeded", "mhpo", {"lr": 1e-6}, 12, seed=3)


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def peak_threads(pid: int, request: Callable[[], httpx.Response]) -> tuple[httpx.Response, int]:
    """`request()`'s answer and the most threads the server process ran while it was being answered."""
    peak, done = [threads_of(pid)], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], threads_of(pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answer = request()
    finally:
        done.set()
        sampler.join()
    return answer, peak[0]


def ids(n: int) -> str:
    return ",".join(str(uuid.uuid4()) for _ in range(n))


def test_the_documented_default_limit() -> None:
    assert Settings().dashboard_max_compare_runs == 20


def test_parallel_reads_run_in_a_bounded_pool() -> None:
    running, most, lock = [0], [0], threading.Lock()

    def read() -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return 1

    assert parallel(*[read] * 100) == [1] * 100
    assert most[0] == MAX_PARALLEL_READS


def test_a_thousand_run_ids_are_refused_on_the_page_before_any_read(server: LiveServer) -> None:
    assert server.pid is not None
    with httpx.Client(base_url=server.url, timeout=120) as client:
        route(client, "/compare", "")  # the pools and connections a first request opens
        before = threads_of(server.pid)
        answer, peak = peak_threads(server.pid, lambda: route(client, "/compare", f"?runs={ids(1000)}"))
    assert answer.status_code == 200, answer.text
    assert f"1000 runs asked for; a comparison shows at most {LIMIT}" in answer.text
    assert "MHPO_DASHBOARD_MAX_COMPARE_RUNS" in answer.text
    assert peak - before <= 2


def test_a_comparison_at_the_limit_reads_through_a_bounded_pool(server: LiveServer) -> None:
    """200 ids the API does not know: a thread per id would be 200 threads; the page says what failed."""
    assert server.pid is not None
    with httpx.Client(base_url=server.url, timeout=300) as client:
        before = threads_of(server.pid)
        answer, peak = peak_threads(server.pid, lambda: route(client, "/compare", f"?runs={ids(LIMIT)}"))
    assert answer.status_code == 200, answer.text
    assert "404" in answer.text
    # the dashboard's pool, plus at most the API's own worker threads answering those reads
    assert peak - before <= MAX_PARALLEL_READS + 45, (before, peak)


def _side_message(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    return str(answer.json().get("sideUpdate", {}).get("callback-error", {}).get("children", ""))


def test_compare_callbacks_answer_a_message_for_an_empty_state_and_unknown_runs(server: LiveServer) -> None:
    unknown = [str(uuid.uuid4()), str(uuid.uuid4())]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        empty = call(client, "compare-metric-graphs.children", {"compare-runs.data": None})
        assert empty.status_code == 200 and "pick two or more runs" in empty.text
        missing = call(
            client, "compare-metric-graphs.children", {"compare-metrics.value": ["a"], "compare-runs.data": unknown}
        )
        assert missing.status_code == 200 and "404" in missing.text
        threshold = call(
            client, "compare-distance.figure", {"compare-threshold.value": 0.1, "compare-runs.data": unknown}
        )
        assert threshold.status_code == 200 and "404" in threshold.text
        too_many = call(client, "compare-distance.figure", {"compare-runs.data": ids(LIMIT + 1).split(",")})
        assert too_many.status_code == 200 and "pick fewer runs" in too_many.text


def test_run_page_callbacks_show_a_message_instead_of_a_500(server: LiveServer, run_id: str) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        empty = call(client, "run-custom-charts.children", {"run-custom-keys.data": {}, "run-state.data": None})
        assert "could not update this view" in _side_message(empty)
        gone = str(uuid.uuid4())
        unknown = call(
            client,
            "run-custom-charts.children",
            {"run-custom-keys.data": {gone: ["train/loss"]}, "run-state.data": {"run_id": gone, "last_step": 3}},
        )
        assert unknown.status_code == 200 and "404" in unknown.text
        shown = call(
            client,
            "run-custom-charts.children",
            {"run-custom-keys.data": {run_id: ["train/loss"]}, "run-state.data": {"run_id": run_id, "last_step": 11}},
        )
        assert shown.status_code == 200 and "sideUpdate" not in shown.json()
    assert "dashboard callback failed" in server.log()  # the internal error is in the server log, not in the page
