"""The "Sampler vs trainer" panel and the `mismatch` heat-map, in a real headless Chromium against `mhpo serve`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

from mhpo.diagnostics import compute_step_stats
from tests.dashboard.browsing import PLOT, open_page, screenshot
from tests.dashboard.seeding import create_run, post_records
from tests.fixtures.server import LiveServer

pytestmark = pytest.mark.browser

STEPS = 30


def mismatch_records(gap: float, growth: float, seed: int) -> list[dict]:
    """Steps whose statistics are the diagnostics' own, from a sampler whose gap grows by `growth` per step."""
    out = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        old = torch.randn(8, 12, generator=g) - 2
        logp = old + torch.randn(8, 12, generator=g) * 0.05
        rollout = old + torch.randn(8, 12, generator=g) * gap * growth**step
        stats = compute_step_stats(
            "grpo", logp, old, torch.randn(8, generator=g), torch.ones(8, 12, dtype=torch.bool), rollout_logp=rollout
        )
        out.append({"step": step, "scalars": stats.scalars, "histograms": stats.histograms, "outliers": []})
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("dashboard-mismatch") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}") as live:
        yield live


@pytest.fixture(scope="module")
def runs(server: LiveServer) -> dict[str, str]:
    ids = {}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for name, records in (
            ("stale", mismatch_records(0.02, 1.12, 1)),
            ("stale-tis", mismatch_records(0.02, 1.02, 2)),
            ("no-sampler", mismatch_records(0.02, 1.0, 3)),
        ):
            ids[name] = create_run(client, "mm", name, "grpo", {"is_correction": "tis" if "tis" in name else "none"})
            if name == "no-sampler":  # the same steps without the sampler's statistics
                for r in records:
                    r["scalars"] = {k: v for k, v in r["scalars"].items() if not k.startswith("mismatch/")}
                    r["histograms"].pop("mismatch")
            post_records(client, ids[name], records)
    return ids


def test_run_page_shows_the_sampler_panel_and_heatmap(server: LiveServer, runs: dict[str, str], page: object) -> None:
    open_page(page, f"{server.url}/runs/{runs['stale']}", f".graph-mismatch {PLOT} .main-svg")
    assert page.is_visible("#run-mismatch")
    names = page.evaluate("(sel) => document.querySelector(sel).data.map(t => t.name)", f".graph-mismatch {PLOT}")
    assert {"mismatch/abs_mean", "mismatch/is_mean", "mismatch/is_min", "mismatch/ess", "mismatch/kl_k3"} <= set(names)
    title = page.evaluate(f"() => document.querySelector('.graph-mismatch {PLOT}').layout.title.text")
    assert "Sampler vs trainer" in title
    heat = page.evaluate(f"() => document.querySelector('#run-mismatch-heatmap {PLOT}').data[0]")
    assert heat["type"] == "heatmap" and len(heat["x"]) == STEPS
    assert "mismatch" in page.inner_text("#run-flags")  # the gap grew ~30x: flagged by the service
    screenshot(page, "run-mismatch")


def test_a_run_without_sampler_statistics_hides_the_panel(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    open_page(page, f"{server.url}/runs/{runs['no-sampler']}", f".graph-policy {PLOT}")
    assert not page.is_visible("#run-mismatch")


def test_compare_page_sets_a_corrected_run_beside_the_uncorrected_one(
    server: LiveServer, runs: dict[str, str], page: object
) -> None:
    ids = f"{runs['stale']},{runs['stale-tis']}"
    open_page(page, f"{server.url}/compare?runs={ids}", "#compare-mismatch")
    heatmaps = page.evaluate(
        f"() => [...document.querySelectorAll('.compare-heatmap {PLOT}')].map(p => p.data[0] && p.data[0].type)"
    )
    assert heatmaps == ["heatmap"] * 4  # log-ratio and sampler-gap heat-maps of both runs
    charts = page.evaluate(
        f"() => [...document.querySelectorAll('.compare-metric {PLOT}')].map(p => p.layout.title.text)"
    )
    assert any("mismatch/abs_mean" in t for t in charts), charts
    screenshot(page, "compare-mismatch")
