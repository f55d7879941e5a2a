"""The states the warnings announce, pinned on the shapes public reports give: a run that stopped
learning (every group degenerate; every completion truncated with a zero gradient) and TRL's
advantage collapse."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

import mhpo_migrations
from mhpo.integrations.names import product_scalars
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.monitoring import DEFAULT_PARAMS, Flag, History, detect


def series(values: np.ndarray | list[float], start: int = 0) -> dict[int, float]:
    return {start + i: float(v) for i, v in enumerate(values)}


def alarms(flags: list[Flag], kind: str | None = None) -> list[Flag]:
    return [f for f in flags if f.severity != "info" and (kind is None or f.kind == kind)]


def test_every_group_degenerate_for_10_rollouts_is_no_signal() -> None:
    """Healthy groups for 30 rollouts, then every group's completions share one reward: `no_signal`
    within the 10 rollouts, once (one episode), naming the fraction."""
    rng = np.random.default_rng(0)
    n = 60
    degenerate = np.concatenate([rng.uniform(0.1, 0.5, 30), np.ones(30)])
    points = {
        "group/degenerate_frac": series(degenerate),
        "policy/entropy": series(0.8 * np.exp(rng.normal(0, 0.03, n))),
        "reward/mean": series(np.concatenate([rng.uniform(0.2, 0.4, 30), np.zeros(30)])),
    }
    flags = detect(History(points), range(n))
    found = alarms(flags, "no_signal")
    assert len(found) == 1 and 30 <= found[0].step <= 39, [(f.step, f.kind) for f in flags]
    assert found[0].step == 30 + DEFAULT_PARAMS.no_signal.degenerate_points - 1
    assert found[0].evidence["key"] == "group/degenerate_frac" and "No learning signal" in found[0].message
    assert not [f for f in alarms(flags) if f.step < 30]


def test_all_completions_truncated_with_a_zero_gradient_is_flagged_within_10_steps() -> None:
    """The silent no-op: every completion cut at the length limit, reward 0, loss 0, grad-norm 0 from the
    first step: `no_signal` (or `truncation`) within 10 steps."""
    n = 40
    points = {
        "policy/truncated_frac": series(np.ones(n)),
        "reward/mean": series(np.zeros(n)),
        "train/loss": series(np.zeros(n)),
        "grad/norm": series(np.zeros(n)),
        "policy/entropy": series(np.full(n, 1.3)),
        "tokens/valid": series(np.full(n, 512.0)),
    }
    flags = alarms(detect(History(points), range(n)))
    kinds = {f.kind for f in flags if f.step < 10}
    assert kinds & {"no_signal", "truncation"}, [(f.step, f.kind) for f in flags]
    zero = next(f for f in flags if f.kind == "no_signal")
    assert zero.evidence["keys"] == ["grad/norm", "train/loss"] and "exactly 0" in zero.message
    truncation = next(f for f in flags if f.kind == "truncation")
    assert truncation.evidence["state"] == "most" and "100%" in truncation.message


def test_a_zero_gradient_now_and_then_is_not_no_signal() -> None:
    rng = np.random.default_rng(3)
    n = 60
    grad = rng.uniform(0.1, 1.0, n)
    grad[::4] = 0.0  # e.g. a mini-batch whose groups were all degenerate
    points = {"grad/norm": series(grad), "train/loss": series(np.where(grad == 0, 0.0, 0.01))}
    assert not alarms(detect(History(points), range(n)), "no_signal")


def test_trl_advantage_collapse_is_no_signal_when_the_zero_std_fraction_passes_0_9() -> None:
    """The reported TRL shape: entropy falls 0.25 -> 0.04 and `frac_reward_zero_std` climbs 0 -> 1.0
    over steps 240-270, the reward then frozen. Nothing in the first 120 steps; `no_signal` once the
    fraction has stayed over 0.9, within 10 steps of passing it."""
    rng = np.random.default_rng(5)
    n = 320
    steps = np.arange(n)
    ramp = np.clip((steps - 240) / 30.0, 0.0, 1.0)
    zero_std = np.clip(ramp + rng.normal(0, 0.01, n) * (ramp < 1), 0.0, 1.0)
    entropy = (0.25 - 0.21 * np.clip((steps - 150) / 120.0, 0.0, 1.0)) * np.exp(rng.normal(0, 0.03, n))
    reward = np.where(steps < 270, 0.3 + 0.2 * np.clip(steps / 240.0, 0, 1) + rng.normal(0, 0.03, n), 0.5)
    metrics = {
        "frac_reward_zero_std": zero_std,
        "entropy": entropy,
        "reward": reward,
        "loss": rng.normal(0, 0.01, n),
        "grad_norm": np.exp(rng.normal(-1, 0.2, n)),
    }
    points: dict[str, dict[int, float]] = {}
    for step in range(n):
        for key, value in product_scalars({k: float(v[step]) for k, v in metrics.items()}).items():
            points.setdefault(key, {})[step] = value
    flags = detect(History(points), range(n))
    assert not [f for f in alarms(flags) if f.step < 120], [(f.step, f.kind, f.message) for f in flags]
    passed = int(np.argmax(zero_std > 0.9))
    found = alarms(flags, "no_signal")
    assert found and passed <= found[0].step <= passed + 10, (passed, [(f.step, f.kind) for f in flags])


def gspo_start(clip_frac: float = 0.45) -> dict[str, dict[int, float]]:
    """A healthy GSPO start: its sequence-level clip window ([1 - 3e-4, 1 + 4e-4]) clips half the tokens."""
    return {
        "ratio/clip_frac": series(np.full(10, clip_frac)),
        "grad/update_ratio": series(np.full(10, 0.004)),
        "train/update_index": series(np.arange(10) % 2),
    }


def test_a_gspo_run_is_held_to_its_own_trust_region_bounds() -> None:
    history = History(gspo_start())
    assert [f.kind for f in detect(history, range(10), loss="grpo")] == ["trust_region"]
    assert not detect(history, range(10), loss="gspo")
    assert DEFAULT_PARAMS.trust_region.bounds_for("gspo") != DEFAULT_PARAMS.trust_region.bounds
    too_fast = gspo_start()
    too_fast["grad/update_ratio"][3] = 0.05
    assert [(f.kind, f.step) for f in detect(History(too_fast), range(10), loss="gspo")] == [("trust_region", 3)]


def test_the_server_judges_a_run_by_its_loss(sqlite_url: str) -> None:
    mhpo_migrations.upgrade(sqlite_url)
    records = [{"step": s, "scalars": {k: v[s] for k, v in gspo_start().items()}} for s in range(10)]
    with TestClient(create_app(Settings(db=sqlite_url))) as client:
        kinds = {}
        for loss in ("gspo", "grpo"):
            run = client.post("/api/v1/runs", json={"project": "p", "name": loss, "loss": loss}).json()["run_id"]
            r = client.post(f"/api/v1/runs/{run}/records", json={"batch_id": loss, "records": records})
            assert r.status_code == 200, r.text
            events = client.get(f"/api/v1/runs/{run}/events").json()["events"]
            kinds[loss] = [e["kind"] for e in events if e["type"] == "flag"]
    assert kinds == {"gspo": [], "grpo": ["trust_region"]}


def test_a_long_entropy_climb_is_judged_alike_over_http_and_at_once(sqlite_url: str) -> None:
    """Entropy 0.5 -> 0.85 over 1,100 steps while the reward rises 0.2 -> 0.7, posted in batches of 50:
    the server keeps only the run's first points and a recent window, and still says what `detect`
    says on the whole stream (where the climb began further back than the window the reward is
    judged on, both judge it on the window)."""
    mhpo_migrations.upgrade(sqlite_url)
    rng = np.random.default_rng(0)
    n = 1300
    k = np.clip((np.arange(n) - 50) / 1100, 0.0, 1.0)
    entropy = (0.5 + 0.35 * k) * np.exp(0.02 * rng.standard_normal(n))
    reward = 0.2 + 0.5 * k + 0.02 * rng.standard_normal(n)
    records = [{"step": s, "scalars": {"policy/entropy": entropy[s], "reward/mean": reward[s]}} for s in range(n)]
    whole = detect(History({"policy/entropy": series(entropy), "reward/mean": series(reward)}), range(n))
    assert whole and {f.kind for f in whole} == {"entropy_surge"}, whole
    with TestClient(create_app(Settings(db=sqlite_url))) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "climb"}).json()["run_id"]
        for start in range(0, n, 50):
            batch = {"batch_id": str(start), "records": records[start : start + 50]}
            assert client.post(f"/api/v1/runs/{run}/records", json=batch).status_code == 200
        events = client.get(f"/api/v1/runs/{run}/events").json()["events"]
    assert [(e["step"], e["kind"], e["severity"]) for e in events if e["type"] == "flag"] == [
        (f.step, f.kind, f.severity) for f in whole
    ]
