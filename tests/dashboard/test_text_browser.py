"""User text is shown as typed on every page, in a real headless Chromium against a real `mhpo serve`.

A run named with a Markdown image and link (and raw HTML), logging a metric key written in
Plotly's pseudo-HTML, with an alert rule of the same name: the runs, run, compare and alerts
pages show that text literally, draw no link or image from it, and the browser never asks
anything of a host other than the loopback server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.dashboard.browsing import PLOT, open_page
from tests.dashboard.seeding import create_run, post_records, records
from tests.fixtures.server import LiveServer

pytestmark = pytest.mark.browser

NAME = "![pixel](http://evil.example/pixel.png) [click me](http://evil.example/) <img src=http://evil.example/x.png>"
KEY = 'custom/<a href="http://evil.example/k">key</a><img src="http://evil.example/k.png"> &amp; %{y}'
STEPS = 12


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str, str]]:
    """(server, the hostile run's id, a plain run's id)."""
    db = tmp_path_factory.mktemp("text") / "mhpo.db"
    with LiveServer(f"sqlite:///{db}") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        hostile = create_run(client, "p", NAME, "mhpo", {"lr": 1e-6})
        plain = create_run(client, "p", "plain", "grpo", {"lr": 2e-6})
        for run_id, seed in ((hostile, 1), (plain, 2)):
            batch = list(records(0, STEPS, seed=seed))
            for step, rec in enumerate(batch):
                rec["scalars"][KEY] = float(step)
            post_records(client, run_id, batch)
        rule = {
            "name": NAME,
            "project": "p",
            "run_id": hostile,
            "condition": {"type": "threshold", "key": KEY, "op": ">", "value": 1e9},
        }
        assert client.post("/api/v1/alert-rules", json=rule).status_code == 201
        yield server, hostile, plain


@pytest.fixture
def watched(page: Any, seeded: tuple[LiveServer, str, str]) -> Iterator[Any]:
    """The page, failing the test if it asks anything of a host but the server's."""
    server = seeded[0]
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    yield page
    own = urlsplit(server.url).netloc
    assert requested and all(urlsplit(u).netloc == own for u in requested), [
        u for u in requested if urlsplit(u).netloc != own
    ]


def _no_markup_from_user_text(page: Any) -> None:
    """No image or outside link anywhere, and no link at all inside the charts."""
    assert page.locator("img").count() == 0
    assert page.evaluate("() => [...document.querySelectorAll('a')].filter(a => a.href.includes('evil')).length") == 0
    assert page.locator(f"{PLOT} svg a").count() == 0  # the modebar's buttons are links outside the svg


def test_runs_and_alerts_pages_show_names_as_typed(seeded: tuple[LiveServer, str, str], watched: Any) -> None:
    server, hostile, _ = seeded
    open_page(watched, server.url + "/", "#runs-table")
    watched.wait_for_selector(f"#runs-table a[href='/runs/{hostile}']")
    assert watched.inner_text(f"#runs-table a[href='/runs/{hostile}']") == NAME
    _no_markup_from_user_text(watched)

    open_page(watched, server.url + "/alerts", f"a[href='/runs/{hostile}']")
    assert NAME in watched.inner_text("body")
    assert all(watched.inner_text(a) == NAME for a in [f"a[href='/runs/{hostile}']"])
    _no_markup_from_user_text(watched)


def test_chart_titles_legends_and_hover_text_show_keys_and_names_as_typed(
    seeded: tuple[LiveServer, str, str], watched: Any
) -> None:
    server, hostile, plain = seeded
    open_page(watched, f"{server.url}/runs/{hostile}", "#run-key-search")
    watched.fill("#run-key-search", "custom/")
    watched.locator(".key-button", has_text="custom/").first.click()
    chart = f".custom-graph {PLOT}"
    watched.wait_for_selector(f"{chart} .gtitle")
    assert watched.text_content(f"{chart} .gtitle") == KEY
    watched.evaluate("(sel) => Plotly.Fx.hover(document.querySelector(sel), [{curveNumber: 0, pointNumber: 3}])", chart)
    watched.wait_for_selector(f"{chart} .hoverlayer > *", state="attached")
    assert KEY in watched.text_content(f"{chart} .hoverlayer")
    _no_markup_from_user_text(watched)

    open_page(watched, f"{server.url}/compare?runs={hostile},{plain}", f".compare-heatmap {PLOT} .gtitle")
    titles = watched.locator(f".compare-heatmap {PLOT} .gtitle").all_text_contents()
    assert f"{NAME} ({hostile[:8]})" in titles
    watched.wait_for_selector(f".compare-metric {PLOT} .legend")
    assert f"{NAME} ({hostile[:8]})" in watched.text_content(f".compare-metric {PLOT} .legend")
    _no_markup_from_user_text(watched)
