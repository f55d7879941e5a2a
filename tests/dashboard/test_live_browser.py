"""Live pages read only what is new: the compare page of live runs and the run page's events, in a real
headless Chromium against a real `mhpo serve` whose access log records the dashboard's API reads.

Each test posts records after the page loaded, waits (generous deadlines, no timing asserted) for
them to be drawn, then checks the reads the polls made (the cursor parameters in the access log)
and what the polls sent to the page (only the new points and events, appended with `Patch`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.dashboard.browsing import PLOT, open_page
from tests.dashboard.seeding import post_records, records, seed_run
from tests.fixtures.server import LiveServer

pytestmark = pytest.mark.browser

SEEDED = 20
ACCESS = re.compile(r'"GET (/api/v1/runs/[^ ]+) HTTP')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("live") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}", args=["--access-log"]) as live:
        yield live


def reads(server: LiveServer, since: int, run_id: str, route: str) -> list[dict[str, list[str]]]:
    """Query parameters of the API reads of `route` for `run_id` logged after byte `since` of the log."""
    found = []
    for path in ACCESS.findall(server.log()[since:]):
        parts = urlsplit(path)
        if parts.path == f"/api/v1/runs/{run_id}/{route}":
            found.append(parse_qs(parts.query, keep_blank_values=True))
    return found


def record_updates(page: Any) -> list[dict[str, Any]]:
    """The outputs of every callback answer the page receives, as {output id: {prop: value}}."""
    seen: list[dict[str, Any]] = []

    def keep(response: Any) -> None:
        if "_dash-update-component" in response.url and response.status == 200:
            seen.append(json.loads(response.text()).get("response", {}))

    page.on("response", keep)
    return seen


def extended(updates: list[dict[str, Any]], output: str, prop: str, location: list[Any]) -> list[Any]:
    """Everything Patch operations appended at `location` of the output with id `output` (its prop `prop`)."""
    out: list[Any] = []
    for update in updates:
        for key, props in update.items():
            value = props.get(prop) if key == output else None
            if isinstance(value, dict) and "operations" in value:
                for op in value["operations"]:
                    if op["operation"] == "Extend" and op["location"] == location:
                        out.extend(op["params"]["value"])
    return out


def alert_rule(server: LiveServer, project: str) -> None:
    rule = {
        "name": "probe high",
        "project": project,
        "cooldown_s": 0,
        "condition": {"type": "threshold", "key": "probe", "op": ">", "value": 5},
    }
    assert httpx.post(f"{server.url}/api/v1/alert-rules", json=rule).status_code == 201


def batch(start: int, stop: int, seed: int, probe_at: int | None = None) -> list[dict[str, Any]]:
    out = list(records(start, stop, seed=seed))
    for r in out:
        r["scalars"]["probe"] = 9.0 if r["step"] == probe_at else 0.0
    return out


def test_a_compare_of_live_runs_appends_only_the_new_points_and_events(server: LiveServer, page: Any) -> None:
    alert_rule(server, "cmp")
    a = seed_run(server.url, "cmp", "live-a", "mhpo", {"lr": 1e-6}, SEEDED, seed=5)
    b = seed_run(server.url, "cmp", "live-b", "grpo", {"lr": 2e-6}, SEEDED, seed=6)
    updates = record_updates(page)
    open_page(page, f"{server.url}/compare?runs={a},{b}", f".compare-metric {PLOT}")
    chart = f"document.querySelector('.compare-metric {PLOT}')"
    before = page.evaluate(f"() => {chart}.data.map(t => t.x.length)")
    assert len(before) == 2 and "no flags or alerts" in page.inner_text("#compare-events")
    loaded = len(server.log())

    with httpx.Client(base_url=server.url) as client:
        post_records(client, a, batch(SEEDED, SEEDED + 5, seed=5, probe_at=SEEDED + 2))
        post_records(client, b, batch(SEEDED, SEEDED + 3, seed=6))
    page.wait_for_function(
        f"(n) => {chart}.data[0].x.length === n[0] && {chart}.data[1].x.length === n[1]",
        arg=[before[0] + 5, before[1] + 3],
        timeout=30_000,
    )
    page.wait_for_function("() => document.querySelector('#compare-events').innerText.includes('probe high')")
    assert page.evaluate(f"() => {chart}.data[0].x.slice(-5)") == list(range(SEEDED, SEEDED + 5))

    for run_id in (a, b):  # every poll read the steps after the ones drawn, and the events after a cursor
        scalars = reads(server, loaded, run_id, "scalars")
        assert scalars and all(int(q["start"][0]) >= SEEDED for q in scalars), scalars
        events = reads(server, loaded, run_id, "events")
        assert events and all(q.get("after", [""])[0].startswith("flag:") for q in events), events
    graph_id = page.evaluate("() => document.querySelector('.compare-metric').id")
    sent = extended(updates, graph_id, "figure", ["data", 0, "x"])
    assert sent == list(range(SEEDED, SEEDED + 5)), sent  # only the new points went to the page
    assert "live-a" in page.inner_text("#compare-events") and "step 22" in page.inner_text("#compare-events")


def test_the_run_page_reads_events_after_its_cursor_and_appends_them(server: LiveServer, page: Any) -> None:
    alert_rule(server, "events")
    with httpx.Client(base_url=server.url) as client:
        run_id = client.post("/api/v1/runs", json={"project": "events", "name": "alerted", "loss": "mhpo"}).json()[
            "run_id"
        ]
        post_records(client, run_id, batch(0, SEEDED, seed=7, probe_at=5))
    updates = record_updates(page)
    open_page(page, f"{server.url}/runs/{run_id}", f".graph-heatmap {PLOT}")
    assert page.locator("#run-flags .flag").count() == 1
    loaded = len(server.log())

    with httpx.Client(base_url=server.url) as client:
        post_records(client, run_id, batch(SEEDED, SEEDED + 5, seed=7, probe_at=SEEDED + 3))
    page.wait_for_function("() => document.querySelectorAll('#run-flags .flag').length === 2", timeout=30_000)
    assert "step 23" in page.inner_text("#run-flags")

    events = reads(server, loaded, run_id, "events")
    assert events and all(q.get("after", [""])[0].startswith("flag:") for q in events), events
    appended = extended(updates, "run-flags", "children", [0, "props", "children"])
    assert len(appended) == 1  # the one new alert, appended to the list the page holds
