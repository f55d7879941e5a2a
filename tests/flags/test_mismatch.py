"""The `mismatch` detector: bands, drift against the run's own earlier level, the idle-clip invariant."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from mhpo.integrations.names import product_scalars
from mhpo_server.monitoring import DEFAULT_PARAMS, FlagParams, History, detect
from tests.flags.mismatch_cases import trl_healthy, trl_jump, trl_top_k, verl_drift


def points(rows: list[dict[str, float]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for step, row in enumerate(rows, 1):
        for key, value in product_scalars(row).items():
            out.setdefault(key, {})[step] = value
    return out


def mismatch_flags(pts: dict[str, dict[int, float]], params: FlagParams = DEFAULT_PARAMS):
    steps = sorted({s for by_step in pts.values() for s in by_step})
    return [f for f in detect(History(pts), steps, params) if f.kind == "mismatch"]


@pytest.mark.parametrize("seed", range(5))
def test_reported_cases_by_seed(seed: int) -> None:
    rows, onset = trl_jump(seed=seed)
    assert [f.step for f in mismatch_flags(points(rows))][:1] == [onset]
    rows, onset = verl_drift(seed=seed)
    [first, *_] = mismatch_flags(points(rows))
    assert onset < first.step <= onset + 70 and first.detector == "log_drift"
    assert mismatch_flags(points(trl_healthy(n=400, seed=seed)[0])) == []


def test_the_unsynced_jump_is_critical_and_says_why() -> None:
    [flag] = mismatch_flags(points(trl_jump()[0]))
    assert flag.severity == "critical" and flag.detector == "band"
    assert "mismatch/abs_mean = 0.201" in flag.message and "mismatch/is_mean = 3.25e-07" in flag.message
    assert {h["key"] for h in flag.evidence["bands"]} == {"mismatch/abs_mean", "mismatch/is_mean"}


def test_a_constant_top_k_bias_is_flagged_from_the_first_step_once() -> None:
    flags = mismatch_flags(points(trl_top_k(n=50)[0]))
    assert [(f.step, f.severity) for f in flags] == [(1, "warning")]


def grow(n: int, onset: int, factor: float, over: int, clip: float | None, seed: int = 0) -> list[dict[str, float]]:
    """k3 KL flat at 1e-3 with noise, then `factor`-fold geometric growth over `over` steps."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, n + 1):
        k3 = 1e-3 * factor ** (min(max(step - onset, 0), over) / over) * float(np.exp(rng.normal(0, 0.1)))
        row = {"mismatch/kl_k3": k3}
        if clip is not None:
            row["ratio/clip_frac"] = clip
        rows.append(row)
    return rows


def test_idle_clip_lowers_the_drift_ratio_and_raises_the_severity() -> None:
    """Probe-the-harness: the clip fraction reads 0.000 at every update while the KL grows 10,000x."""
    idle = mismatch_flags(points(grow(300, 100, 1e4, 150, clip=0.0)))
    busy = mismatch_flags(points(grow(300, 100, 1e4, 150, clip=0.05)))
    assert idle and busy
    assert 100 < idle[0].step < busy[0].step
    assert idle[0].severity == "critical" and idle[0].evidence["idle_clip"] == ["ratio/clip_frac"]
    assert busy[0].severity == "warning" and busy[0].evidence["idle_clip"] == []
    assert "exactly 0 while it grows" in idle[0].message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mismatch/abs_mean", 0.06),
        ("mismatch/is_mean", 2.5),
        ("mismatch/ess", 0.2),
        ("mismatch/kl_k1", -0.15),
        ("mismatch/kl_k3", 0.12),
        ("mismatch/chi2", 1.5),
    ],
)
def test_any_single_key_is_enough(key: str, value: float) -> None:
    healthy = {
        "mismatch/abs_mean": 0.01,
        "mismatch/is_mean": 1.0,
        "mismatch/ess": 0.98,
        "mismatch/kl_k1": 0.001,
        "mismatch/kl_k3": 0.001,
        "mismatch/chi2": 0.01,
    }
    rows = [{key: healthy[key]} for _ in range(20)] + [{key: value}]
    assert [f.step for f in mismatch_flags(points(rows))] == [21]


def test_the_listener_window_holds_everything_the_detector_reads() -> None:
    """Judged on only the last `history_steps()` points of each key, the flags are the same."""
    pts = points(verl_drift()[0])
    full = [(f.step, f.severity) for f in mismatch_flags(pts)]
    depth = DEFAULT_PARAMS.history_steps()
    steps = sorted({s for by_step in pts.values() for s in by_step})
    windowed = []
    for step in steps:
        cut = {k: {s: v for s, v in by_step.items() if s <= step} for k, by_step in pts.items()}
        cut = {k: dict(sorted(by_step.items())[-depth:]) for k, by_step in cut.items()}
        last: dict[str, int] = {}
        windowed += [
            (f.step, f.severity) for f in detect(History(cut), [step], last_flagged=last) if f.kind == "mismatch"
        ]
    assert full and windowed[: len(full)] == full


def test_empty_steps_flag_nothing() -> None:
    rows = [{"mismatch/abs_mean": 0.5, "tokens/valid": 0.0}, {"mismatch/abs_mean": 0.5, "tokens/valid": 10.0}]
    assert [f.step for f in mismatch_flags(points(rows))] == [2]


def test_parameters_are_bounded_and_merge() -> None:
    merged = DEFAULT_PARAMS.merged({"mismatch": {"ratio": 8.0}})
    assert merged.mismatch.ratio == 8.0 and merged.mismatch.bands == DEFAULT_PARAMS.mismatch.bands
    with pytest.raises(ValidationError, match="ratio"):
        DEFAULT_PARAMS.merged({"mismatch": {"ratio": 1.0}})
    with pytest.raises(ValidationError, match="lookbak"):
        DEFAULT_PARAMS.merged({"mismatch": {"lookbak": 10}})
    assert {"mismatch/abs_mean", "mismatch/ess", "ratio/clip_frac"} <= DEFAULT_PARAMS.keys()
    off = DEFAULT_PARAMS.merged({"mismatch": {"enabled": False}})
    assert mismatch_flags(points(trl_jump()[0]), off) == []


def test_the_clip_is_idle_only_when_every_clip_fraction_logged_is_zero() -> None:
    rows = grow(300, 100, 1e4, 150, clip=0.0)
    for row in rows:
        row["ratio/clip_frac_high"] = 0.03  # one side clips: the ratio does see something
    [first, *_] = mismatch_flags(points(rows))
    assert first.evidence["idle_clip"] == [] and first.severity == "warning"
