"""The reported failure shapes (slow entropy collapse, entropy blow-up, KL jump) and the healthy
shapes that used to raise false alarms (alternating on/off-policy updates, empty steps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

import mhpo_migrations
from mhpo_server.app import create_app
from mhpo_server.config import Settings
from mhpo_server.monitoring import DEFAULT_PARAMS, Flag, FlagParams, History, detect
from tests.flags.synthetic import Stream, pattern_stream

SEEDS = range(10)
ONSET = 150


def run(pattern: str, seed: int) -> list[Flag]:
    stream = pattern_stream(pattern, seed, onset=ONSET)
    return detect(History(stream.points()), range(stream.n_steps))


def first_after_onset(flags: list[Flag], kind: str) -> int | None:
    steps = [f.step - ONSET for f in flags if f.kind == kind and f.step >= ONSET]
    return steps[0] if steps else None


def diversity_falls_too(stream: Stream, over: float = 120.0) -> None:
    """Group diversity (distinct completions per group) falling 80 % with the entropy, from the onset."""
    t = np.clip((np.arange(stream.n_steps) - ONSET) / over, 0.0, 1.0)
    stream.scalars["group/distinct_frac"] = stream.scalars["group/distinct_frac"] * (1.0 - 0.8 * t)


def stream_entropy(pattern: str, seed: int) -> np.ndarray:
    return pattern_stream(pattern, seed, onset=ONSET).scalars["policy/entropy"]


def alarms(flags: list[Flag], kind: str) -> list[Flag]:
    return [f for f in flags if f.kind == kind and f.severity != "info"]


@pytest.mark.parametrize("pattern", ["linear_entropy", "geometric_entropy"])
def test_slow_entropy_collapse_with_falling_diversity_is_a_warning_within_30_steps(pattern: str) -> None:
    """1.2 -> 0.05 over 200 steps while group diversity falls and every other key stays flat: the
    forecast sees the entropy crossing a quarter of its early level ahead (a linear decline has
    lost 14 % in 30 steps, against a per-point noise of about 4.5 %), the diversity confirms it."""
    for seed in SEEDS:
        stream = pattern_stream(pattern, seed, onset=ONSET)
        diversity_falls_too(stream)
        flags = detect(History(stream.points()), range(stream.n_steps))
        warnings = alarms(flags, "collapse")
        assert warnings and 0 <= warnings[0].step - ONSET <= 30, (seed, [(f.step, f.severity) for f in flags])
        assert warnings[0].evidence["state"] == "forecast"
        assert "group/distinct_frac falling" in warnings[0].evidence["corroborated_by"]
        assert not [f for f in flags if f.severity != "info" and f.step < ONSET], seed


@pytest.mark.parametrize("pattern", ["linear_entropy", "geometric_entropy"])
def test_entropy_alone_is_foreseen_as_information_and_a_warning_in_the_state(pattern: str) -> None:
    """Only the entropy moves: its forecast is flagged within 30 steps (informational while nothing
    confirms it: entropy alone wanders by tens of percent in healthy runs), a warning comes no later
    than the state itself (under a quarter of the early level), one per episode, then a critical
    under a tenth."""
    for seed in SEEDS:
        flags = run(pattern, seed)
        collapse = [f for f in flags if f.kind == "collapse" and f.step >= ONSET]
        assert collapse and collapse[0].step - ONSET <= 30, (seed, [(f.step, f.severity) for f in collapse])
        warned = alarms(flags, "collapse")
        assert [f.severity for f in warned] == ["warning", "critical"], (seed, [(f.step, f.severity) for f in warned])
        warning, critical = warned
        assert warning.step <= int(np.argmax(stream_entropy(pattern, seed) < 0.3)) + 3
        assert critical.evidence["fraction"] < 0.1 and "under a tenth" in critical.message


def test_a_rising_reward_softens_the_collapse_message_but_never_hides_it() -> None:
    stream = pattern_stream("geometric_entropy", 0, onset=ONSET)
    up = np.clip((np.arange(stream.n_steps) - ONSET) / 100.0, 0.0, 1.0)
    stream.scalars["reward/mean"] = np.clip(stream.scalars["reward/mean"] + 0.6 * up, 0, 1)
    flags = detect(History(stream.points()), range(stream.n_steps))
    below = [f for f in alarms(flags, "collapse") if f.evidence["state"] == "below"]
    assert below and below[0].severity == "warning"
    assert "reward rose" in below[0].message and below[0].evidence["reward_rising"]


def test_entropy_falling_to_5_percent_with_a_flat_reward_is_a_warning() -> None:
    """Entropy 1.0 -> 0.05 over 100 rollouts, reward flat at 0.3: a collapse warning, critical later."""
    n = 160
    rng = np.random.default_rng(0)
    entropy = np.where(np.arange(n) < 30, 1.0, np.maximum(0.05, 1.0 - 0.0095 * (np.arange(n) - 30)))
    entropy = entropy * np.exp(rng.normal(0, 0.03, n))
    points = {
        "policy/entropy": dict(enumerate(entropy.tolist())),
        "reward/mean": dict(enumerate((0.3 + rng.normal(0, 0.02, n)).tolist())),
    }
    flags = alarms(detect(History(points), range(n)), "collapse")
    assert [f.severity for f in flags][-1] == "critical", [(f.step, f.severity) for f in flags]
    warning = next(f for f in flags if f.severity == "warning")
    assert warning.step <= int(np.argmax(entropy < 0.25)) + 3


def test_a_rebound_after_a_dip_is_quiet() -> None:
    """Entropy dips to 60 % of its early level and comes back to it: no surge, no collapse."""
    n = 300
    rng = np.random.default_rng(1)
    dip = 1.0 - 0.4 * np.sin(np.pi * np.clip((np.arange(n) - 60) / 120.0, 0.0, 1.0))
    points = {
        "policy/entropy": dict(enumerate((dip * np.exp(rng.normal(0, 0.03, n))).tolist())),
        "reward/mean": dict(enumerate((0.4 + rng.normal(0, 0.02, n)).tolist())),
    }
    flags = [f for f in detect(History(points), range(n)) if f.severity != "info"]
    assert not flags, [(f.step, f.kind, f.message) for f in flags]


def test_entropy_blowup_raises_entropy_surge_within_30_steps() -> None:
    for seed in SEEDS:
        flags = run("entropy_blowup", seed)
        surge = [f for f in flags if f.kind == "entropy_surge" and f.step >= ONSET]
        assert surge and surge[0].step - ONSET <= 30 and surge[0].severity == "warning", seed
        assert surge[0].evidence["ratio"] >= DEFAULT_PARAMS.entropy_surge.ratio
        assert surge[0].evidence["reward"] is not None and not surge[0].evidence["reward_rising"]


def test_entropy_rising_with_the_reward_is_not_a_surge_until_the_reward_stops_rising() -> None:
    """Entropy x4 while the reward climbs 0.5 over the same 100 steps: exploration that pays, no warning
    (informational). Once the reward has stayed flat for the 30 rollouts it is judged on while the
    entropy stays at 4x its early level, that is the surge state, and it is announced."""
    stream = pattern_stream("entropy_blowup", 3, onset=ONSET)
    up = np.clip((np.arange(stream.n_steps) - ONSET) / 100.0, 0.0, 1.0)
    stream.scalars["reward/mean"] = np.clip(stream.scalars["reward/mean"] + 0.5 * up, 0, 1)
    flags = [f for f in detect(History(stream.points()), range(stream.n_steps)) if f.kind == "entropy_surge"]
    climbing = [f for f in flags if f.step < ONSET + 100]
    assert climbing and all(f.severity == "info" and f.evidence["reward_rising"] for f in climbing), flags
    later = alarms(flags, "entropy_surge")
    assert later and later[0].step >= ONSET + 100 + DEFAULT_PARAMS.entropy_surge.reward_rise.window_points // 2


def test_kl_x100_is_flagged_within_2_steps() -> None:
    for seed in SEEDS:
        flags = run("kl_jump", seed)
        delay = first_after_onset(flags, "kl_spike")
        assert delay is not None and delay <= 2, seed
        hit = next(f for f in flags if f.kind == "kl_spike")
        assert hit.detector == "robust_z" and hit.evidence["signals"][0]["key"] == "policy/kl_k3"


@pytest.mark.parametrize("pattern", ["alternating", "empty_steps"])
def test_healthy_alternating_and_empty_step_streams_raise_no_alarm(pattern: str) -> None:
    """On-policy updates (x = 0 exactly) never feed an off-policy baseline; empty steps are not NaN.

    (The grad-norm's heavy-tailed noise in these clean streams gives the rare `grad_spike`
    of the clean suite, whatever the step kinds; it is counted there.)
    """
    watched = ("hazard_spike", "kl_spike", "non_finite", "erosion", "collapse", "entropy_surge")
    for seed in SEEDS:
        alarms = [f for f in run(pattern, seed) if f.severity != "info" and f.kind in watched]
        assert not alarms, (seed, [f.message for f in alarms])


def test_on_policy_steps_are_inferred_without_update_index() -> None:
    """Without `train/update_index`, ratio/min = ratio/max = 0 marks the on-policy steps: same flags."""
    for seed in SEEDS:
        stream = pattern_stream("alternating", seed)
        with_index = detect(History(stream.points()), range(stream.n_steps))
        del stream.scalars["train/update_index"]
        inferred = detect(History(stream.points()), range(stream.n_steps))
        assert [(f.kind, f.step) for f in inferred] == [(f.kind, f.step) for f in with_index]


def test_an_on_policy_constant_never_makes_an_off_policy_value_a_spike() -> None:
    """The reported false alarm: zeta_p99 exactly 1.3278 on every on-policy step, ordinary values between."""
    rng = np.random.default_rng(0)
    n = 200
    on = np.arange(n) % 2 == 0
    p99 = np.where(on, 1.3278, 2.0 * np.exp(rng.normal(0, 0.05, n)))
    points = {
        "hazard/zeta_p99": dict(enumerate(p99.tolist())),
        "train/update_index": dict(enumerate(np.where(on, 0.0, 1.0).tolist())),
    }
    assert not detect(History(points), range(n))


def test_an_empty_step_flags_nothing() -> None:
    stream = pattern_stream("empty_steps", 1)
    empty = {i for i in range(stream.n_steps) if stream.empty is not None and stream.empty[i]}
    flags = detect(History(stream.points()), range(stream.n_steps))
    assert empty and not [f for f in flags if f.step in empty]


def test_an_empty_step_posted_to_the_server_raises_nothing(sqlite_url: str) -> None:
    mhpo_migrations.upgrade(sqlite_url)
    with TestClient(create_app(Settings(db=sqlite_url))) as client:
        run_id = client.post("/api/v1/runs", json={"project": "p", "name": "empty"}).json()["run_id"]
        stream = pattern_stream("alternating", 2)
        records = stream.records(0, 120)
        records.append({"step": 120, "time": 1.7e9 + 120, "scalars": {"tokens/valid": 0.0, "train/loss": 0.0}})
        records += stream.records(121, 200)
        r = client.post(f"/api/v1/runs/{run_id}/records", json={"batch_id": "b", "records": records})
        assert r.status_code == 200, r.text
        events = client.get(f"/api/v1/runs/{run_id}/events").json()["events"]
        assert not [e for e in events if e["severity"] != "info"], events


def test_a_flat_entropy_moving_a_little_is_quiet_and_under_a_quarter_is_a_collapse() -> None:
    """A perfectly flat entropy (no noise at all) that moves by 1 % raises nothing; one that drops
    under a quarter of its early level is the collapse state, a warning naming both levels."""
    n = 150
    entropy = np.full(n, 0.8)
    entropy[100:] = 0.79
    assert not detect(History({"policy/entropy": dict(enumerate(entropy.tolist()))}), range(n))
    entropy[100:] = 0.15
    flags = detect(History({"policy/entropy": dict(enumerate(entropy.tolist()))}), range(n))
    assert [(f.kind, f.severity) for f in flags] == [("collapse", "warning")]
    assert flags[0].step == 101 and flags[0].evidence["reference"] == 0.8 and flags[0].evidence["level"] == 0.15
    assert "19% of its early level 0.8" in flags[0].message


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"hazard_spike": {"window_steps": 1e20}}, "window_steps"),
        ({"erosion": {"baseline_steps": 10**9}}, "baseline_steps"),
        ({"collapse": {"forecast": {"horizon_steps": 10**9}}}, "horizon_steps"),
        ({"collapse": {"warning_fraction": 1.5}}, "warning_fraction"),
        ({"no_signal": {"degenerate_points": 0}}, "degenerate_points"),
        ({"truncation": {"max_frac": 2}}, "max_frac"),
        ({"grad_spike": {"z": math.inf}}, "z"),
        ({"kl_spike": {"min_ratio": 0.5}}, "min_ratio"),
        ({"erosion": {"signals": [{"key": "policy/entropy", "direction": "down", "min_abs": -1}]}}, "min_abs"),
        ({"on_policy": {"min_steps": 0}}, "min_steps"),
    ],
)
def test_every_parameter_is_bounded(override: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        DEFAULT_PARAMS.merged(override)


def test_an_unbounded_window_is_a_422_naming_the_field(sqlite_url: str) -> None:
    mhpo_migrations.upgrade(sqlite_url)
    with TestClient(create_app(Settings(db=sqlite_url))) as client:
        r = client.put("/api/v1/projects/p/flag-params", json={"hazard_spike": {"window_steps": 1e20}})
        assert r.status_code == 422, r.text
        assert ["body", "hazard_spike", "window_steps"] in [d["loc"] for d in r.json()["detail"]]
        assert client.get("/api/v1/projects/p/flag-params").json()["overrides"] == {}


def test_every_numeric_parameter_declares_bounds() -> None:
    """A new parameter without bounds fails here, not in production."""

    def walk(model: type, path: str) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, FlagParams.__mro__[1]):
                missing += walk(ann, f"{path}{name}.")
            elif ann in (int, float):
                bounds = [m for m in info.metadata if hasattr(m, "le") or hasattr(m, "lt")]
                if not bounds:
                    missing.append(path + name)
        return missing

    from mhpo_server.monitoring.params import (
        CollapseParams,
        DriftParams,
        NoSignalParams,
        OnPolicyParams,
        Signal,
        SpikeParams,
        SurgeParams,
        TruncationParams,
    )

    models = (DriftParams, SpikeParams, Signal, OnPolicyParams, CollapseParams, SurgeParams, NoSignalParams)
    missing = [n for m in (*models, TruncationParams) for n in walk(m, f"{m.__name__}.")]
    assert not missing, missing


@pytest.mark.parametrize("pattern", ["alternating", "entropy_blowup", "linear_entropy", "empty_steps"])
def test_batching_does_not_change_the_flags_of_any_shape(pattern: str) -> None:
    """Evaluating in batches, each with only the history before it, gives the flags of the whole run."""
    stream = pattern_stream(pattern, 4, onset=ONSET)
    whole = detect(History(stream.points()), range(stream.n_steps))
    last: dict[str, int] = {}
    pieces: list[Flag] = []
    for start in range(0, stream.n_steps, 37):
        stop = min(start + 37, stream.n_steps)
        pieces += detect(History(stream.points(stop)), range(start, stop), last_flagged=last)
    assert pieces == whole


def test_a_forecast_is_held_back_while_the_reward_clearly_rises() -> None:
    """Entropy spent on a rising reward may be intended sharpening: the forecast ahead of the state is
    informational while the reward climbs (with the reward in its evidence), even with the group
    diversity confirming it; once the reward levels off and the entropy keeps falling, it warns."""
    stream = pattern_stream("linear_entropy", 0, onset=ONSET)
    diversity_falls_too(stream)
    stream.scalars["reward/mean"] = np.clip(
        stream.scalars["reward/mean"] + 0.6 * np.clip((np.arange(stream.n_steps) - ONSET + 30) / 150.0, 0.0, 1.0), 0, 1
    )
    flags = [f for f in detect(History(stream.points()), range(stream.n_steps)) if f.kind == "collapse"]
    rising = [f for f in flags if f.evidence["state"] == "forecast" and f.step < ONSET + 120]  # the reward's climb
    assert rising and rising[0].step - ONSET <= 30
    assert all(f.severity == "info" and f.evidence["reward_rising"] for f in rising), [
        (f.step, f.severity) for f in flags
    ]
    assert [f for f in flags if f.severity == "warning" and f.step >= ONSET + 120], (
        "once the reward levels off, it warns"
    )
