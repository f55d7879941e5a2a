"""Seed a real server over its HTTP API with runs whose records look like a GRPO-family run.

Each step draws per-token log-ratios x and advantages A, and computes from them, with
numpy, the statistics the diagnostics module would send: the `log_ratio`
histograms (all tokens and split by the sign of A; 64 bins on [-2, 2]), ratio, hazard
(MHPO's zeta with the paper's defaults), gradient and policy scalars, and the top tokens
by |x|. `drift` widens the ratio distribution over steps (a run leaving its trust region);
`spike_at` makes the hazard p99 jump at one step (a `hazard_spike` for the flags).
Used by the dashboard tests (which also take the page images in docs/) and `bench/dashboard.py`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np

BINS, LO, HI = 64, -2.0, 2.0
TOKENS = 512
C, K_POS, LAMBDA_POS, K_NEG, LAMBDA_NEG = 1.5, 1.5, 1.0, 2.0, 0.8


def _histogram(x: np.ndarray) -> dict[str, Any]:
    counts, _ = np.histogram(x, bins=BINS, range=(LO, HI))  # the last bin includes HI itself
    under, over = int((x < LO).sum()), int((x > HI).sum())
    return {
        "lo": LO,
        "hi": HI,
        "counts": counts.tolist(),
        "underflow": under,
        "overflow": over,
        "min": float(x.min()) if len(x) else math.nan,
        "max": float(x.max()) if len(x) else math.nan,
        "sum": float(x.sum()),
        "sumsq": float((x * x).sum()),
    }


def _softplus(v: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, v)


def record(step: int, rng: np.random.Generator, drift: float = 0.0, spike_at: int | None = None) -> dict[str, Any]:
    """One C1 record for `step`."""
    scale = 0.05 + drift * step / 1000.0
    x = rng.normal(0.0, scale, TOKENS)
    adv = rng.choice([-1.0, 1.0], TOKENS) * rng.uniform(0.2, 1.5, TOKENS)
    psi = C * np.tanh(x / C)
    zeta_pos = (_softplus(psi) / LAMBDA_POS) ** K_POS
    zeta_neg = (_softplus(-psi) / LAMBDA_NEG) ** K_NEG
    zeta = zeta_pos + zeta_neg
    mult = np.exp(psi - zeta) / np.cosh(x / C) ** 2
    p99 = float(np.percentile(zeta, 99)) * (8.0 if step == spike_at else 1.0)
    grad = 1.0 + 0.1 * abs(rng.standard_normal())
    scalars = {
        "ratio/mean": float(x.mean()),
        "ratio/std": float(x.std()),
        "ratio/min": float(x.min()),
        "ratio/max": float(x.max()),
        "ratio/p01": float(np.percentile(x, 1)),
        "ratio/p50": float(np.median(x)),
        "ratio/p99": float(np.percentile(x, 99)),
        "ratio/pos_mass": float((x > 0).mean()),
        "ratio/neg_mass": float((x < 0).mean()),
        "ratio/clip_frac": float(((x > math.log(1.2)) | (x < math.log(0.8))).mean()),
        "ratio/frac_above_0.2": float((x > 0.2).mean()),
        "ratio/frac_below_0.2": float((x < -0.2).mean()),
        "hazard/zeta_mean": float(zeta.mean()),
        "hazard/zeta_p99": p99,
        "hazard/zeta_pos_mean": float(zeta_pos.mean()),
        "hazard/zeta_neg_mean": float(zeta_neg.mean()),
        "hazard/survival_mean": float(np.exp(-zeta).mean()),
        "grad/norm": grad,
        "grad/norm/attention": 0.6 * grad,
        "grad/norm/mlp": 0.7 * grad,
        "grad/multiplier_mean": float(mult.mean()),
        "grad/multiplier_min": float(mult.min()),
        "grad/multiplier_max": float(mult.max()),
        "grad/vanish_frac": float((mult < 0.01).mean()),
        "policy/entropy": 2.0 - 0.3 * step / (step + 100),
        "policy/kl_k1": float(-x.mean()),
        "policy/kl_k3": float((np.exp(x) - 1 - x).mean()),
        "policy/logp_mean": -1.2 + 0.001 * step,
        "policy/length_mean": 120.0 + 10 * math.sin(step / 10),
        "reward/mean": min(1.0, 0.2 + step / 500),
        "reward/std": 0.3,
        "train/loss": float(-(np.exp(psi - zeta) * adv).mean()),
    }
    top = np.argsort(-np.abs(x))[:8]
    outliers = [
        {
            "sample": int(i // 64),
            "position": int(i % 64),
            "token_id": int(1000 + i),
            "text": f"tok{i}",
            "x": float(x[i]),
            "A": float(adv[i]),
            "zeta": float(zeta[i]),
        }
        for i in top
    ]
    return {
        "step": step,
        "time": 1.7e9 + step,
        "scalars": scalars,
        "histograms": {
            "log_ratio": _histogram(x),
            "log_ratio/adv_pos": _histogram(x[adv > 0]),
            "log_ratio/adv_neg": _histogram(x[adv < 0]),
        },
        "outliers": outliers,
    }


def records(start: int, stop: int, seed: int = 0, drift: float = 0.0, spike_at: int | None = None) -> Iterator[dict]:
    """Records for steps [start, stop); each step's draws depend only on (seed, step)."""
    for step in range(start, stop):
        yield record(step, np.random.default_rng([seed, step]), drift, spike_at)


def create_run(client: httpx.Client, project: str, name: str, loss: str, config: dict[str, Any]) -> str:
    response = client.post("/api/v1/runs", json={"project": project, "name": name, "loss": loss, "config": config})
    response.raise_for_status()
    return response.json()["run_id"]


def post_records(client: httpx.Client, run_id: str, batch: list[dict[str, Any]]) -> None:
    body = json.dumps({"batch_id": uuid.uuid4().hex, "records": batch})
    response = client.post(f"/api/v1/runs/{run_id}/records", content=body, headers={"content-type": "application/json"})
    response.raise_for_status()


def seed_run(
    base_url: str,
    project: str,
    name: str,
    loss: str,
    config: dict[str, Any],
    steps: int,
    seed: int = 0,
    drift: float = 0.0,
    spike_at: int | None = None,
    batch: int = 200,
) -> str:
    """Create a run and post `steps` records in batches; returns the run id."""
    with httpx.Client(base_url=base_url, timeout=120) as client:
        run_id = create_run(client, project, name, loss, config)
        for start in range(0, steps, batch):
            post_records(client, run_id, list(records(start, min(steps, start + batch), seed, drift, spike_at)))
    return run_id
