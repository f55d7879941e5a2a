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
from tests.flags.synthetic import pattern_stream

SEEDS = range(10)
ONSET = 150


def run(pattern: str, seed: int) -> list[Flag]:
    stream = pattern_stream(pattern, seed, onset=ONSET)
    return detect(History(stream.points()), range(stream.n_steps))


def first_after_onset(flags: list[Flag], kind: str) -> int | None:
    steps = [f.step - ONSET for f in flags if f.kind == kind and f.step >= ONSET]
    return steps[0] if steps else None


@pytest.mark.parametrize("pattern", ["linear_entropy", "geometric_entropy"])
def test_slow_entropy_collapse_is_flagged_within_30_steps(pattern: str) -> None:
    """1.2 -> 0.05 over 200 steps with every other key logged and flat: a `collapse` flag.

    Entropy alone is one signal, so the flag is informational (a healthy run that learns
    spends entropy too). A linear decline moves entropy 14 % in 30 steps against a
    per-point noise of about 4.5 %: the level and trend tests agreeing near the threshold
    are what catch every seed in time.
    """
    delays = [first_after_onset(run(pattern, seed), "collapse") for seed in SEEDS]
    assert all(d is not None and d <= 30 for d in delays), delays


@pytest.mark.parametrize("seed", SEEDS)
def test_collapse_with_a_growing_ratio_tail_is_a_warning_within_60_steps(seed: int) -> None:
    """Entropy down and the mass of x > 0.2 up (+5 % of the tokens over 60 steps) are two independent votes: a warning."""
    stream = pattern_stream("linear_entropy", seed, onset=ONSET)
    t = np.clip((np.arange(stream.n_steps) - ONSET) / 60.0, 0.0, 1.0)
    stream.scalars["ratio/frac_above_0.2"] = stream.scalars["ratio/frac_above_0.2"] + 0.05 * t
    flags = detect(History(stream.points()), range(stream.n_steps))
    alarms = [f for f in flags if f.kind == "collapse" and f.severity != "info" and f.step >= ONSET]
    assert alarms and alarms[0].step - ONSET <= 60, (seed, [(f.step, f.severity) for f in flags])
    assert alarms[0].evidence["independent_votes"] >= 2
    assert not [f for f in flags if f.severity != "info" and f.step < ONSET], seed


def test_entropy_and_group_diversity_are_one_vote() -> None:
    """Token entropy and group diversity are two views of one spread, which a sharpening policy
    (a healthy run that learns) lowers together: both declining is informational, not a warning."""
    stream = pattern_stream("linear_entropy", 0, onset=ONSET)
    t = np.clip((np.arange(stream.n_steps) - ONSET) / 120.0, 0.0, 1.0)
    stream.scalars["group/distinct_frac"] = stream.scalars["group/distinct_frac"] * (1.0 - 0.8 * t)
    flags = detect(History(stream.points()), range(stream.n_steps))
    collapse = [f for f in flags if f.kind == "collapse" and f.step >= ONSET]
    assert collapse, "the decline is flagged"
    assert all(f.severity == "info" for f in collapse), [(f.step, f.severity, f.message) for f in collapse]
    both = [f for f in collapse if f.evidence["votes"] == 2]
    assert both and all(f.evidence["independent_votes"] == 1 for f in both)


def test_entropy_blowup_raises_entropy_surge_within_30_steps() -> None:
    for seed in SEEDS:
        flags = run("entropy_blowup", seed)
        surge = [f for f in flags if f.kind == "entropy_surge" and f.step >= ONSET]
        assert surge and surge[0].step - ONSET <= 30 and surge[0].severity == "warning", seed
        assert surge[0].evidence["unless"][0]["key"] == "reward/mean"


def test_entropy_rising_with_the_reward_is_not_a_surge() -> None:
    stream = pattern_stream("entropy_blowup", 3, onset=ONSET)
    up = np.clip((np.arange(stream.n_steps) - ONSET) / 100.0, 0.0, 1.0)
    stream.scalars["reward/mean"] = np.clip(stream.scalars["reward/mean"] + 0.5 * up, 0, 1)
    flags = detect(History(stream.points()), range(stream.n_steps))
    assert not [f for f in flags if f.kind == "entropy_surge"]


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


def test_minimum_meaningful_change_stops_enormous_z_from_a_constant_baseline() -> None:
    """A perfectly flat entropy (MAD 0) moving by less than its floor is no vote, however large z is."""
    n = 150
    entropy = np.full(n, 0.8)
    entropy[100:] = 0.79  # 0.01 nat: not a collapse
    flags = detect(History({"policy/entropy": dict(enumerate(entropy.tolist()))}), range(n))
    assert not flags
    entropy[100:] = 0.5  # 0.3 nat (37 %): a collapse
    flags = detect(History({"policy/entropy": dict(enumerate(entropy.tolist()))}), range(n))
    assert {f.kind for f in flags} == {"collapse"} and flags[0].step >= 100
    assert all(f.severity == "info" for f in flags), "entropy is the only signal logged: informational"
    assert math.isinf(float(flags[0].evidence["signals"][0]["z"])) or float(flags[0].evidence["signals"][0]["z"]) > 5


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"hazard_spike": {"window_steps": 1e20}}, "window_steps"),
        ({"collapse": {"baseline_steps": 10**9}}, "baseline_steps"),
        ({"grad_spike": {"z": math.inf}}, "z"),
        ({"kl_spike": {"min_ratio": 0.5}}, "min_ratio"),
        ({"collapse": {"signals": [{"key": "policy/entropy", "direction": "down", "min_abs": -1}]}}, "min_abs"),
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

    from mhpo_server.monitoring.params import DriftParams, OnPolicyParams, Signal, SpikeParams

    missing = [n for m in (DriftParams, SpikeParams, Signal, OnPolicyParams) for n in walk(m, f"{m.__name__}.")]
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


def test_collapse_while_the_reward_clearly_rises_is_informational_only() -> None:
    """The reward veto keeps a collapse flag visible but never an alarm: entropy spent on a rising
    reward is sharpening, even with a second signal (the ratio tail) voting."""
    stream = pattern_stream("linear_entropy", 0, onset=ONSET)
    t = np.clip((np.arange(stream.n_steps) - ONSET) / 60.0, 0.0, 1.0)
    stream.scalars["ratio/frac_above_0.2"] = stream.scalars["ratio/frac_above_0.2"] + 0.05 * t
    stream.scalars["reward/mean"] = np.clip(
        stream.scalars["reward/mean"] + 0.6 * np.clip((np.arange(stream.n_steps) - ONSET + 60) / 300.0, 0.0, 1.0), 0, 1
    )
    flags = [f for f in detect(History(stream.points()), range(stream.n_steps)) if f.kind == "collapse"]
    after = [f for f in flags if f.step >= ONSET]
    assert after and after[0].step - ONSET <= 30
    vetoed = [f for f in after if any(u["vote"] for u in f.evidence["unless"])]
    assert vetoed and all(f.severity == "info" for f in vetoed), [(f.step, f.severity) for f in after]
