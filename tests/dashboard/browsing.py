"""Helpers of the real-browser tests: open a page and wait for it, save a screenshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"
PLOT = ".js-plotly-plot"


def open_page(page: Any, url: str, ready: str) -> None:
    """Navigate and wait until `ready` is on the page and the network is idle."""
    page.goto(url)
    page.wait_for_selector(ready, timeout=30_000)
    page.wait_for_load_state("networkidle")


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as artifacts/dashboard/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
