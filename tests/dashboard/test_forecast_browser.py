"""The run page's entropy budget and its informational flags, in a real headless Chromium against `mhpo serve`.

A run whose entropy starts falling 0.04 per step at step 55, with a hazard p99 spike (an informational
flag): the page says "entropy budget: about N steps" as the server forecasts it, draws the info flag as
a small grey circle and the entropy's collapse warning (the forecast's) as a cross, and moves the
budget when steps arrive.
The alerts page offers the server's flag kinds (asked over HTTP, as a navigation does).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mhpo_dashboard import figures
from mhpo_server.monitoring import KINDS
from tests.dashboard import dash_http
from tests.dashboard.browsing import PLOT, open_page, screenshot
from tests.dashboard.seeding import create_run, post_records, records
from tests.fixtures.server import LiveServer

pytestmark = pytest.mark.browser

STEPS = 80
SPIKE_AT = 50
BUDGET = re.compile(r"entropy budget: about (\d+) steps")
MARKERS = """(sel) => document.querySelector(sel).data.filter(t => t.mode === 'markers')
    .map(t => ({name: t.name, x: t.x, symbol: t.marker.symbol, color: t.marker.color}))"""


def declining(start: int, stop: int) -> list[dict[str, Any]]:
    """Seeded records whose policy entropy holds at 2.0 for 55 steps, then falls 0.04 per step with the
    group diversity (a collapse the forecast sees ahead; no rollout index: one point per step)."""
    out = list(records(start, stop, seed=3, spike_at=SPIKE_AT))
    for r in out:
        fallen = max(0, r["step"] - 55)
        r["scalars"]["policy/entropy"] = 2.0 - 0.04 * fallen
        r["scalars"]["group/distinct_frac"] = 0.9 - 0.01 * fallen
        r["scalars"]["reward/mean"] = 0.3  # a flat reward: nothing the entropy was spent on
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("forecast") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}", args=["--access-log"]) as live:
        yield live


def _line(page: Any, graph: str, step: int) -> dict[str, Any]:
    shapes = page.evaluate(f"() => document.querySelector('.graph-{graph} {PLOT}').layout.shapes")
    return next(s for s in shapes[1:] if s["x0"] == step and s.get("name") != "nan")


def test_the_run_page_shows_the_entropy_budget_and_draws_info_flags_as_no_alarm(server: LiveServer, page: Any) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        run_id = create_run(client, "budget", "declining", "grpo", {})
        post_records(client, run_id, declining(0, STEPS))
        forecast = client.get(f"/api/v1/runs/{run_id}/forecast").json()
        events = client.get(f"/api/v1/runs/{run_id}/events").json()["events"]
    info = next(e for e in events if e["kind"] == "hazard_spike")
    warning = next(e for e in events if e["kind"] == "collapse")
    assert (info["severity"], info["step"], warning["severity"]) == ("info", SPIKE_AT, "warning")

    open_page(page, f"{server.url}/runs/{run_id}", f".graph-hazard {PLOT}")
    text = page.inner_text("#run-entropy-budget")
    found = BUDGET.search(text)
    assert found and int(found.group(1)) == forecast["steps_left"] > 0, text
    assert f"entropy at {forecast['fraction']:.0%} of its early level" in text

    hazard = page.evaluate(MARKERS, f".graph-hazard {PLOT}")
    info_marks = [t for t in hazard if t["name"] == "info flags" and SPIKE_AT in t["x"]]
    assert len(info_marks) == 1 and info_marks[0]["symbol"] == "circle-open", hazard
    assert not [t for t in hazard if t["name"] == "flags" and SPIKE_AT in t["x"]], hazard
    policy = page.evaluate(MARKERS, f".graph-policy {PLOT}")
    alarm = next(t for t in policy if t["name"] == "flags" and warning["step"] in t["x"])
    assert alarm["symbol"] == "x" and alarm["color"] == [figures.SEVERITY_COLOURS["warning"]]
    assert _line(page, "hazard", SPIKE_AT)["line"]["dash"] == "dot"
    assert _line(page, "policy", warning["step"])["line"]["dash"] == "solid"
    flags = page.inner_text("#run-flags")
    assert "hazard_spike · info (not an alarm)" in flags and "collapse · WARNING" in flags
    screenshot(page, "run-entropy-budget")

    loaded = len(server.log())
    with httpx.Client(base_url=server.url, timeout=60) as client:
        post_records(client, run_id, declining(STEPS, STEPS + 10))
    page.wait_for_function(
        "(old) => document.querySelector('#run-entropy-budget').innerText !== old", arg=text, timeout=30_000
    )
    reads = server.log()[loaded:].count(f"GET /api/v1/runs/{run_id}/forecast ")
    assert reads == 1  # one read, by the refresh that brought the new steps; the quiet polls read none
    later = httpx.get(f"{server.url}/api/v1/runs/{run_id}/forecast").json()
    assert page.inner_text("#run-entropy-budget") == figures.entropy_budget_text(later)
    assert later["step"] == STEPS + 9 and later["steps_left"] < forecast["steps_left"]


def test_the_alerts_page_offers_the_flag_kinds_the_server_lists(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answer, found = dash_http.route(client, "/alerts")
    assert answer.status_code == 200, answer.text
    assert found["rule-kind"]["options"] == ["*", *KINDS]
    assert {"label": "info (not an alarm)", "value": "info"} in found["rule-min_severity"]["options"]
