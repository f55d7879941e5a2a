"""The dashboard in a real headless Chromium against a real `mhpo serve`, seeded over HTTP.

One server and one browser for the module (starting them dominates the cost); each test
opens its own page and fails on any console error or uncaught page exception. Screenshots
of every page go to artifacts/dashboard/ (git-ignored).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.dashboard.browsing import PLOT, open_page, screenshot
from tests.dashboard.seeding import post_records, records, seed_run
from tests.fixtures.server import LiveServer

pytestmark = pytest.mark.browser

STEPS = 120
SPIKE_AT = 90


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("dashboard") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}") as live:
        yield live


@pytest.fixture(scope="module")
def runs(server: LiveServer) -> dict[str, str]:
    """An MHPO run with a hazard spike and a drifting GRPO run (different lr and loss)."""
    common = {"model": "tiny-gpt", "seed": 1, "group_size": 8}
    mhpo_id = seed_run(
        server.url,
        "demo",
        "mhpo-baseline",
        "mhpo",
        {**common, "lr": 1e-6, "hparams": {"c": 1.5, "k_pos": 1.5}},
        STEPS,
        seed=1,
        spike_at=SPIKE_AT,
    )
    grpo_id = seed_run(
        server.url,
        "demo",
        "grpo-baseline",
        "grpo",
        {**common, "lr": 3e-6, "hparams": {"eps": 0.2}},
        STEPS,
        seed=2,
        drift=2.0,
    )
    return {"mhpo": mhpo_id, "grpo": grpo_id}


def _trace_lengths(page: object, graph: str) -> list[int]:
    return page.evaluate(
        "(sel) => document.querySelector(sel).data.map(t => (t.x || []).length)", f".graph-{graph} {PLOT}"
    )


def test_runs_page_lists_runs_and_builds_a_compare_link(server: LiveServer, runs: dict[str, str], page: object) -> None:
    open_page(page, server.url + "/", "#runs-table")
    text = page.inner_text("#runs-table")
    assert "mhpo-baseline" in text and "grpo-baseline" in text and str(STEPS - 1) in text
    page.locator("#runs-table input[type=checkbox]").nth(0).check()
    page.locator("#runs-table input[type=checkbox]").nth(1).check()
    page.wait_for_function("() => document.querySelector('#runs-compare-link').href.includes('runs=')")
    href = page.get_attribute("#runs-compare-link", "href")
    assert runs["mhpo"] in href and runs["grpo"] in href
    screenshot(page, "runs")


def test_run_page_shows_heatmap_panels_flags_and_outliers(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    open_page(page, f"{server.url}/runs/{runs['mhpo']}", f".graph-heatmap {PLOT}")
    heatmap = page.evaluate(f"() => document.querySelector('.graph-heatmap {PLOT}').data[0]")
    assert heatmap["type"] == "heatmap" and len(heatmap["x"]) == STEPS and len(heatmap["z"]) == STEPS
    for panel, key in [
        ("trust_region", "ratio/mean"),
        ("hazard", "hazard/zeta_p99"),
        ("gradients", "grad/norm/mlp"),
        ("policy", "policy/entropy"),
    ]:
        names = page.evaluate("(sel) => document.querySelector(sel).data.map(t => t.name)", f".graph-{panel} {PLOT}")
        assert key in names, (panel, names)
    step_names = page.evaluate(f"() => document.querySelector('#run-step-histogram {PLOT}').data.map(t => t.name)")
    assert {"tokens A>0", "tokens A<0", "M(x) mhpo A>0", "M(x) mhpo A<0"} <= set(step_names)
    assert "hazard_spike" in page.inner_text("#run-flags")
    assert "tok" in page.inner_text("#run-outliers")
    screenshot(page, "run")


def test_clicking_a_flag_selects_its_step_everywhere(server: LiveServer, runs: dict[str, str], page: object) -> None:
    open_page(page, f"{server.url}/runs/{runs['mhpo']}", ".flag-button")
    page.locator(".flag-button", has_text="hazard_spike").first.click()
    page.wait_for_function(
        f"(s) => document.querySelector('#run-step-histogram {PLOT}').layout.title.text.startsWith('step ' + s + ':')",
        arg=SPIKE_AT,
    )
    assert f"selected step {SPIKE_AT}" in page.inner_text("#run-selected-label")
    assert f"at step {SPIKE_AT}" in page.inner_text("#run-outliers")
    marker = page.evaluate(f"() => document.querySelector('.graph-hazard {PLOT}').layout.shapes[0]")
    assert marker["x0"] == SPIKE_AT and marker["visible"]


def test_run_page_loads_plotly_once_from_the_cartesian_bundle_and_points_select_steps(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    """The renderer hook loads the cartesian bundle early and dcc.Graph reuses it: the full
    bundle is never fetched, every chart draws, and clicking a point still selects its step."""
    scripts: list[str] = []
    page.on("request", lambda r: scripts.append(r.url) if "plotly" in r.url and ".js" in r.url else None)
    open_page(page, f"{server.url}/runs/{runs['mhpo']}", f".graph-policy {PLOT} .main-svg")
    page.wait_for_function(f"() => [...document.querySelectorAll('{PLOT}')].every(p => p._fullLayout)")
    assert len(scripts) == 1 and "plotly-cartesian-" in scripts[0], scripts
    assert f"selected step {STEPS - 1}" in page.inner_text("#run-selected-label")
    drag = page.locator(f".graph-policy {PLOT} .nsewdrag").first
    drag.scroll_into_view_if_needed()
    box = drag.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    page.wait_for_selector(f".graph-policy {PLOT} .hoverlayer > *", state="attached")  # clicks hit the hovered point
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    page.wait_for_function(
        f"() => !document.querySelector('#run-selected-label').innerText.includes('step {STEPS - 1}')"
    )
    step = int(page.inner_text("#run-selected-label").split()[2])
    assert 0 < step < STEPS - 1
    page.wait_for_function(
        f"(s) => document.querySelector('#run-step-histogram {PLOT}').layout.title.text.startsWith('step ' + s + ':')",
        arg=step,
    )


def test_records_posted_while_open_appear_without_reload(server: LiveServer, page: object) -> None:
    """The page's live poll appends them (how fast: `python bench/dashboard.py`, the "live" row)."""
    run_id = seed_run(server.url, "live", "live-run", "mhpo", {"lr": 1e-6}, 20, seed=3)
    open_page(page, f"{server.url}/runs/{run_id}", f".graph-heatmap {PLOT}")
    assert _trace_lengths(page, "heatmap") == [20]
    hazard_before = _trace_lengths(page, "hazard")[0]
    page.evaluate("() => { window.notReloaded = true; }")  # a reload would start a fresh window
    with httpx.Client(base_url=server.url) as client:
        post_records(client, run_id, list(records(20, 25, seed=3)))
    page.wait_for_function(
        f"() => document.querySelector('.graph-heatmap {PLOT}').data[0].x.length === 25", timeout=10_000
    )
    page.wait_for_function(
        f"(n) => document.querySelector('.graph-hazard {PLOT}').data[0].x.length === n",
        arg=hazard_before + 5,
        timeout=10_000,
    )
    assert "last step 24" in page.inner_text("#run-summary")
    assert page.evaluate("() => window.notReloaded === true"), "the page was not reloaded"


def test_a_custom_chart_gets_live_points_appended_and_keeps_its_zoom(server: LiveServer, page: object) -> None:
    run_id = seed_run(server.url, "live", "custom-live", "mhpo", {"lr": 1e-6}, 20, seed=4)
    open_page(page, f"{server.url}/runs/{run_id}", f".graph-heatmap {PLOT}")
    page.fill("#run-key-search", "grad/norm")
    page.locator(".key-button", has_text="grad/norm").first.click()
    page.wait_for_selector(f".custom-graph {PLOT}")
    chart = f"document.querySelector('.custom-graph {PLOT}')"
    page.wait_for_function(f"() => {chart}.data[0].x.length === 20")
    page.evaluate(f"() => Plotly.relayout({chart}, {{'xaxis.range': [2, 8]}})")
    with httpx.Client(base_url=server.url) as client:
        post_records(client, run_id, list(records(20, 25, seed=4)))
    page.wait_for_function(f"() => {chart}.data[0].x.length === 25", timeout=10_000)
    assert page.evaluate(f"() => {chart}.layout.xaxis.range") == [2, 8]


def test_compare_page_shows_both_runs_and_their_config_difference(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    open_page(page, f"{server.url}/compare?runs={runs['mhpo']},{runs['grpo']}", f".compare-heatmap {PLOT}")
    page.wait_for_function(f"() => document.querySelectorAll('.compare-heatmap {PLOT}').length === 2")
    names = page.evaluate(f"() => document.querySelector('.compare-metric {PLOT}').data.map(t => t.name)")
    assert any("mhpo-baseline" in n for n in names) and any("grpo-baseline" in n for n in names)
    config = page.inner_text("#compare-config")
    assert "lr" in config and "hparams.eps" in config and "loss" in config
    assert "seed" not in config and "group_size" not in config
    assert "parts from the first run at step" in page.inner_text("#compare-parting")
    screenshot(page, "compare")


def test_alerts_page_creates_a_rule_that_the_api_returns(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    open_page(page, server.url + "/alerts", "#alerts-create")
    page.fill("#rule-name", "zeta p99 above 4")
    page.fill("#rule-value", "4")
    page.click("#alerts-create")
    page.wait_for_function("() => document.querySelector('#alerts-message').innerText.startsWith('created rule')")
    rules = httpx.get(f"{server.url}/api/v1/alert-rules").json()["rules"]
    rule = next(r for r in rules if r["name"] == "zeta p99 above 4")
    assert rule["project"] == "demo" and rule["enabled"]
    assert rule["condition"] == {"type": "threshold", "key": "hazard/zeta_p99", "op": ">", "value": 4.0, "for_steps": 1}
    assert "zeta p99 above 4" in page.inner_text("#alerts-rules")
    screenshot(page, "alerts")


def test_api_paths_keep_their_own_answers_beside_the_dashboard(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    missing = httpx.get(f"{server.url}/api/v1/no-such-route")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/json")
    assert httpx.get(f"{server.url}/runs/anything").headers["content-type"].startswith("text/html")
