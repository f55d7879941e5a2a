"""Daily-use dashboard behaviour in a real headless Chromium against a real `mhpo serve`.

One server and one browser for the module. Seeded over HTTP: a field-style run whose even
steps are on-policy (`train/update_index` 0, log-ratio statistics exactly 0), with custom
keys (`eval/accuracy`, `val/AR@100`), NaN steps around an isolated finite point and a hazard
spike that fires an alert rule; and a run that logs 5,000 scalar keys. Each test fails on a
console error, an uncaught page exception or any HTTP 5xx answer. The run, compare and
alerts pages are saved to artifacts/dashboard/ (git-ignored; copied to docs/ by hand).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.dashboard.browsing import PLOT, open_page, screenshot
from tests.dashboard.seeding import create_run, post_records, records, seed_run
from tests.fixtures.server import LiveServer

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1280, "height": 1000}  # the narrowest width the pages must fit without scrolling

STEPS = 60
SPIKE_AT = 41
NAN_STEPS = [20, 21, 22, 24, 25, 26]
ISOLATED = 23
MANY_KEYS = 5_000


def field_records() -> list[dict]:
    """Two mini-batches per rollout: even steps on-policy, odd steps off-policy."""
    out = []
    for rec in records(0, STEPS, seed=7, spike_at=SPIKE_AT):
        step, scalars = rec["step"], rec["scalars"]
        scalars["train/update_index"] = float(step % 2)
        if step % 2 == 0:
            scalars.update({k: 0.0 for k in scalars if k.startswith("ratio/")})
        if step in NAN_STEPS:
            scalars["policy/entropy"] = math.nan
        if step % 10 == 0:
            scalars["eval/accuracy"] = 0.3 + step / 200
            scalars["val/AR@100"] = 0.5 + step / 400
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("daily") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}") as live:
        yield live


@pytest.fixture(scope="module")
def runs(server: LiveServer) -> dict[str, str]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        rule = {
            "name": "zeta p99 high",
            "project": "field",
            "condition": {"type": "threshold", "key": "hazard/zeta_p99", "op": ">", "value": 3.0, "for_steps": 1},
            "severity": "critical",
            "cooldown_s": 0,
            "channels": ["dashboard"],
        }
        client.post("/api/v1/alert-rules", json=rule).raise_for_status()
        field = create_run(client, "field", "field-run", "mhpo", {"lr": 1e-6, "hparams": {"c": 1.5}})
        post_records(client, field, field_records())
        many = create_run(client, "field", "many-keys", "mhpo", {"lr": 1e-6})
        post_records(
            client,
            many,
            [
                {
                    "step": s,
                    "time": 1.7e9 + s,
                    "scalars": {f"grad/norm/layer_{i}": i + s / 10 for i in range(MANY_KEYS)},
                }
                for s in range(3)
            ],
        )
    baseline = seed_run(
        server.url, "field", "grpo-baseline", "grpo", {"lr": 3e-6, "hparams": {"eps": 0.2}}, STEPS, seed=8, drift=2.0
    )
    return {"field": field, "many": many, "baseline": baseline}


def _traces(page: object, graph: str) -> list[dict]:
    return page.evaluate(
        "(sel) => document.querySelector(sel).data.map(t => ({name: t.name, x: t.x, y: t.y, mode: t.mode}))",
        f".graph-{graph} {PLOT}",
    )


def test_custom_key_added_from_the_explorer_is_drawn_and_kept(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    url = f"{server.url}/runs/{runs['field']}"
    open_page(page, url, f".graph-training {PLOT}")
    assert "train/loss" in [t["name"] for t in _traces(page, "training")]
    page.fill("#run-key-search", "accura")
    page.locator(".key-button", has_text="eval/accuracy").click()
    page.wait_for_selector(f".custom-graph {PLOT}")
    page.wait_for_function(f"() => document.querySelector('.custom-graph {PLOT}').data[0].name === 'eval/accuracy'")
    trace = page.evaluate(f"() => document.querySelector('.custom-graph {PLOT}').data[0]")
    assert trace["x"] == list(range(0, STEPS, 10)) and "markers" in trace["mode"]
    open_page(page, url, f".custom-graph {PLOT}")  # kept for this run across a reload
    assert page.evaluate(f"() => document.querySelector('.custom-graph {PLOT}').data[0].name") == "eval/accuracy"
    page.fill("#run-key-search", "eval")
    page.wait_for_function("() => document.querySelector('#run-key-count').innerText.startsWith('1 matching')")
    screenshot(page, "daily-run")
    page.locator(".remove-chart").click()
    page.wait_for_selector("#run-custom-empty")


def test_nan_steps_are_marked_and_an_isolated_point_is_drawn(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    open_page(page, f"{server.url}/runs/{runs['field']}", f".graph-policy {PLOT}")
    entropy = next(t for t in _traces(page, "policy") if t["name"] == "policy/entropy")
    assert "markers" in entropy["mode"]
    assert entropy["y"][ISOLATED] is not None and all(entropy["y"][s] is None for s in NAN_STEPS)
    bands = page.evaluate(
        f"() => document.querySelector('.graph-policy {PLOT}').layout.shapes"
        ".filter(s => s.name === 'nan').map(s => s.x0 + 0.5)"
    )
    assert sorted(bands) == NAN_STEPS
    titles = page.evaluate(f"() => document.querySelector('.graph-hazard {PLOT}').layout.yaxis.title.text")
    assert "hazard" in titles


def test_ratio_and_hazard_charts_switch_between_off_policy_and_all_steps(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    open_page(page, f"{server.url}/runs/{runs['field']}", f".graph-trust_region {PLOT}")
    steps = next(t for t in _traces(page, "trust_region") if t["name"] == "ratio/mean")["x"]
    assert steps == list(range(1, STEPS, 2))
    page.get_by_label("all steps").check()
    page.wait_for_function(
        f"() => document.querySelector('.graph-trust_region {PLOT}').data"
        f".find(t => t.name === 'ratio/mean').x.length === {STEPS}"
    )
    hazard = next(t for t in _traces(page, "hazard") if t["name"] == "hazard/zeta_p99")["x"]
    assert hazard == list(range(STEPS))


def test_five_thousand_keys_paint_list_and_draw(server: LiveServer, runs: dict[str, str], page: object) -> None:
    open_page(page, f"{server.url}/runs/{runs['many']}", f".graph-gradients {PLOT}")
    assert f"{MANY_KEYS} matching keys" in page.inner_text("#run-key-count")
    assert len(_traces(page, "gradients")) >= 2
    page.fill("#run-key-search", "layer_4999")
    page.locator(".key-button", has_text="grad/norm/layer_4999").click()
    page.wait_for_function(
        f"() => document.querySelector('.custom-graph {PLOT}')?.data[0].name === 'grad/norm/layer_4999'"
    )


def test_compare_leaves_out_on_policy_steps(server: LiveServer, runs: dict[str, str], page: object) -> None:
    open_page(page, f"{server.url}/compare?runs={runs['field']},{runs['baseline']}", f"#compare-distance {PLOT}")
    steps = page.evaluate(f"() => document.querySelector('#compare-distance {PLOT}').data[0].x")
    assert steps == list(range(1, STEPS, 2))
    screenshot(page, "daily-compare")


def test_alerts_form_follows_the_condition_type_and_tables_read_well(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    deadline = time.monotonic() + 20
    while not httpx.get(f"{server.url}/api/v1/alerts").json()["alerts"] and time.monotonic() < deadline:
        time.sleep(0.2)
    open_page(page, server.url + "/alerts", "#alerts-create")
    for field in ("key", "op", "value", "z", "kind"):  # dropdowns render once their code chunk loaded
        page.wait_for_selector(f"#rule-{field}", state="attached")

    def shown() -> dict[str, bool]:
        return {
            f: page.evaluate("(id) => document.getElementById(id).closest('label').offsetParent !== null", f"rule-{f}")
            for f in ("key", "op", "value", "z", "kind")
        }

    assert shown() == {"key": True, "op": True, "value": True, "z": False, "kind": False}
    page.get_by_label("spike", exact=True).check()
    page.wait_for_function("() => !!document.querySelector('#rule-z').closest('label').offsetParent")
    assert shown() == {"key": True, "op": False, "value": False, "z": True, "kind": False}
    page.get_by_label("flag", exact=True).check()
    page.wait_for_function("() => !!document.querySelector('#rule-kind').closest('label').offsetParent")
    assert shown() == {"key": False, "op": False, "value": False, "z": False, "kind": True}
    page.fill("#rule-name", "any flag")
    page.click("#alerts-create")
    page.wait_for_function("() => document.querySelector('#alerts-message').innerText.startsWith('created rule')")
    rules = page.inner_text("#alerts-rules")
    assert "any flag of severity warning or worse" in rules and "hazard/zeta_p99 > 3 for 1 step" in rules
    fired = page.inner_text("#alerts-fired")
    assert "zeta p99 high" in fired and "field-run" in fired and "alert alert" not in fired
    assert page.locator("#alerts-fired a", has_text="field-run").first.get_attribute("href") == f"/runs/{runs['field']}"
    assert time.strftime("%Y-", time.gmtime()) in fired
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "daily-alerts")


def test_runs_page_says_whether_each_run_is_live(server: LiveServer, runs: dict[str, str], page: object) -> None:
    open_page(page, server.url + "/", "#runs-table")
    live = page.locator("#runs-table td[data-dash-column=live]").all_inner_texts()
    assert live and set(live) <= {"yes", "no"}


def test_a_key_logged_while_the_page_is_open_joins_the_explorer(server: LiveServer, page: object) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        run_id = create_run(client, "field", "growing", "mhpo", {})
        post_records(client, run_id, list(records(0, 3, seed=5)))
        open_page(page, f"{server.url}/runs/{run_id}", "#run-key-count")
        post_records(client, run_id, [{"step": 3, "time": 1.7e9, "scalars": {"eval/new_metric": 1.0}}])
    page.wait_for_selector(".key-button:has-text('eval/new_metric')", state="attached", timeout=10_000)
    page.fill("#run-key-search", "new_metric")
    page.wait_for_selector("#run-key-count:has-text('1 matching')")
    assert page.locator(".key-button", has_text="eval/new_metric").is_visible()
