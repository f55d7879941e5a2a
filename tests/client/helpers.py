"""Reading back what a run stored, through the query API only (as a user would)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from tests.conftest import strict_loads
from tests.fixtures.server import LiveServer


@dataclass(frozen=True)
class Target:
    """A running server and the token its clients use (None with auth off)."""

    server: LiveServer
    token: str | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def get_json(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        response = httpx.get(f"{self.url}{path}", headers=headers, timeout=30.0)
        response.raise_for_status()
        return strict_loads(response.text)  # non-finite numbers back as floats

    def stored_steps(self, run_id: str, key: str) -> list[int]:
        """Every step stored for one scalar key, one entry per stored row (no downsampling)."""
        answer = self.get_json(f"/api/v1/runs/{run_id}/scalars?keys={key}&max_points=10000")
        assert not answer["downsampled"], "ask for fewer steps: the count must not be downsampled"
        return list(answer["series"].get(key, {"step": []})["step"])

    def stored_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/api/v1/runs/{run_id}"))


def scalars(step: int, n: int = 30) -> dict[str, float]:
    """A trainer-like step: `n` scalars."""
    return {"train/loss": 1.0 / (step + 1), **{f"ratio/k{i:02d}": step * 0.001 + i for i in range(n - 1)}}


def histogram(step: int) -> dict[str, Any]:
    counts = [step % 7 + i for i in range(64)]
    return {
        "lo": -2.0,
        "hi": 2.0,
        "counts": counts,
        "underflow": 1,
        "overflow": 2,
        "min": -2.5,
        "max": 2.5,
        "sum": 0.5 * step,
        "sumsq": 3.0 + step,
    }
