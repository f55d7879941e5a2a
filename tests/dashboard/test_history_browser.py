"""The run page in a real headless Chromium: a rewind redraws the open page, rewinds and forks
are listed under History, and a fork links its parent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dashboard.browsing import PLOT, open_page, screenshot
from tests.dashboard.seeding import seed_run
from tests.fixtures.server import LiveServer

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db: Path = tmp_path_factory.mktemp("history") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}") as live:
        yield live


def test_rewind_redraws_the_open_page_and_a_fork_links_its_parent(server: LiveServer, page: object) -> None:
    run_id = seed_run(server.url, "history", "parent-run", "mhpo", {"lr": 1e-6}, 40, seed=5)
    open_page(page, f"{server.url}/runs/{run_id}", f".graph-heatmap {PLOT}")
    assert "no rewinds or forks" in page.inner_text("#run-history")
    assert httpx.post(f"{server.url}/api/v1/runs/{run_id}/rewind", json={"step": 29}).status_code == 200
    page.wait_for_function(f"() => document.querySelector('.graph-heatmap {PLOT}').data[0].x.length === 30")
    page.wait_for_function("() => document.querySelector('#run-history').innerText.includes('rewind')")
    assert "last step 29" in page.inner_text("#run-summary")
    hazard = page.evaluate(f"() => Math.max(...document.querySelector('.graph-hazard {PLOT}').data[0].x)")
    assert hazard <= 29

    fork = httpx.post(f"{server.url}/api/v1/runs/{run_id}/fork", json={"step": 19, "name": "child-run"}).json()
    open_page(page, f"{server.url}/runs/{fork['run_id']}", "#run-parent-link")
    assert "forked from" in page.inner_text("#run-parent") and "at step 19" in page.inner_text("#run-parent")
    assert page.evaluate(f"() => document.querySelector('.graph-heatmap {PLOT}').data[0].x.length") == 20
    assert "fork" in page.inner_text("#run-history")
    screenshot(page, "run-fork")
    page.click("#run-parent-link")
    page.wait_for_function("() => document.querySelector('#run-summary').innerText.includes('parent-run')")
    history = page.inner_text("#run-history")
    assert "rewind" in history and "child-run" in history
    assert page.get_attribute(".history-link", "href").endswith(fork["run_id"])


def test_an_mlflow_run_link_opens_the_run_page(server: LiveServer, page: object) -> None:
    """The link an MLflow client prints ("View run ... at: <tracking URI>/#/experiments/<id>/runs/<id>")."""
    run_id = seed_run(server.url, "mlflow-links", "linked-run", "grpo", {"lr": 1e-6}, 5, seed=3)
    open_page(page, f"{server.url}/#/experiments/mlflow-links/runs/{run_id}", "#run-summary")
    page.wait_for_function("() => document.querySelector('#run-summary').innerText.includes('linked-run')")
    assert page.url == f"{server.url}/runs/{run_id}"
