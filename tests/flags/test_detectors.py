"""The detectors on labelled synthetic streams: each fires on its event in time, none fires on clean noise."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mhpo_server.monitoring import (
    DEFAULT_PARAMS,
    DETECTORS,
    KINDS,
    Flag,
    FlagParams,
    History,
    detect,
    register_detector,
)
from mhpo_server.monitoring.stats import row_nanmedian
from tests.flags.synthetic import (
    GOAL_DELAY,
    INJECTED_KINDS,
    Score,
    Stream,
    generate_stream,
    generate_suite,
    score,
)

ALL = frozenset({"info", "warning", "critical"})
ALARMS = frozenset({"warning", "critical"})
PER_KIND = 8
CLEAN_STREAMS = 6
CLEAN_STEPS = 2000


def flags_of(stream: Stream, params: FlagParams = DEFAULT_PARAMS) -> list[tuple[str, int]]:
    return [(f.kind, f.step) for f in detect(History(stream.points()), range(stream.n_steps), params)]


@cache
def suite() -> tuple[list[Stream], list[list[Flag]]]:
    streams = generate_suite(seed=7, per_kind=PER_KIND, n_steps=400, clean=CLEAN_STREAMS, clean_steps=CLEAN_STEPS)
    return streams, [detect(History(s.points()), range(s.n_steps)) for s in streams]


def scored(severities: frozenset[str] = ALL) -> Score:
    streams, flags = suite()
    return score(streams, [[(f.kind, f.step) for f in found if f.severity in severities] for found in flags])


@pytest.mark.parametrize("kind", INJECTED_KINDS)
def test_each_injected_event_is_flagged_within_its_stated_delay(kind: str) -> None:
    result = scored(ALARMS if kind != "on_policy" else ALL)
    delays = result.delays.get(kind, [])
    assert result.detected[kind] == result.total[kind] == PER_KIND, (
        f"{kind}: {result.detected[kind]}/{result.total[kind]} flagged within {GOAL_DELAY[kind]} steps; delays {delays}"
    )
    assert max(delays) <= GOAL_DELAY[kind]


def test_goals_spikes_within_2_steps_and_collapse_erosion_within_30() -> None:
    assert GOAL_DELAY["hazard_spike"] <= 2 and GOAL_DELAY["grad_spike"] <= 2
    assert GOAL_DELAY["collapse"] <= 30 and GOAL_DELAY["erosion"] <= 30


def test_clean_noisy_streams_give_fewer_than_one_false_flag_per_2000_steps() -> None:
    """Warnings and criticals are the alarms; informational flags (one signal alone) are bounded separately."""
    result = scored(ALARMS)
    assert result.clean_steps >= CLEAN_STREAMS * CLEAN_STEPS
    assert result.false_flags * 2000 < result.clean_steps, (
        f"{result.false_flags} false flags in {result.clean_steps} clean steps: {result.false_by_kind}"
    )
    info = scored(ALL).false_flags - result.false_flags
    assert info * 500 < result.clean_steps, f"{info} informational flags in {result.clean_steps} clean steps"


def test_clean_streams_really_are_noisy_with_trends() -> None:
    """Guards the test above against a generator that became too easy."""
    stream = generate_stream(11, 2000)
    grad = np.log(stream.scalars["grad/norm"])
    assert np.std(np.diff(grad)) > 0.15
    entropy = stream.scalars["policy/entropy"]
    assert entropy[-100:].mean() < 0.9 * entropy[:100].mean()
    assert np.max(stream.scalars["grad/norm"]) > 2.0 * np.median(stream.scalars["grad/norm"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_fire_non_finite_once_per_onset(bad: float) -> None:
    loss = dict.fromkeys(range(20), 0.1)
    loss.update({10: bad, 11: bad, 15: bad})
    history = History({"train/loss": loss, "grad/norm": dict.fromkeys(range(20), 1.0)})
    flags = [f for f in detect(history, range(20)) if f.kind == "non_finite"]
    assert [f.step for f in flags] == [10, 15]
    assert all(f.severity == "critical" and "train/loss" in f.evidence["values"] for f in flags)
    expected = "NaN" if math.isnan(bad) else ("Infinity" if bad > 0 else "-Infinity")
    assert flags[0].evidence["values"]["train/loss"] == expected


def test_on_policy_is_informational_and_fires_once() -> None:
    stream = generate_stream(3, 300, "on_policy", onset=100)
    flags = [f for f in detect(History(stream.points()), range(300)) if f.kind == "on_policy"]
    assert len(flags) == 1
    assert flags[0].severity == "info"
    assert flags[0].step == 100 + DEFAULT_PARAMS.on_policy.min_steps - 1


def test_flags_carry_step_severity_detector_and_evidence() -> None:
    stream = generate_stream(5, 400, "grad_spike", onset=200)
    flag = next(f for f in detect(History(stream.points()), range(400)) if f.kind == "grad_spike")
    event = flag.as_event()
    assert event["step"] == 200 and event["detector"] == "robust_z" and event["severity"] in {"warning", "critical"}
    signal = event["evidence"]["signals"][0]
    assert signal["key"] == "grad/norm"
    assert signal["value"] > signal["baseline"] * DEFAULT_PARAMS.grad_spike.min_ratio
    assert signal["threshold"]["z"] == DEFAULT_PARAMS.grad_spike.z


def test_drift_evidence_lists_the_votes() -> None:
    stream = generate_stream(21, 400, "erosion", onset=200)
    flags = [f for f in detect(History(stream.points()), range(400)) if f.kind == "erosion"]
    severities = [f.severity for f in flags]
    assert severities in (["warning"], ["critical"], ["warning", "critical"]), (
        "one event gives one flag per severity it reaches (refractory period; a critical after a warning "
        f"is an escalation): {[(f.step, f.severity) for f in flags]}"
    )
    assert flags[0].detector == "drift"
    evidence = flags[0].evidence
    assert evidence["votes"] >= max(evidence["needed"], 2), "a warning takes two independent signals"
    keys = {"key", "test", "value", "baseline", "change", "noise", "z", "threshold", "vote"}
    assert all(keys <= set(s) for s in evidence["signals"])
    assert "signals judged" not in flags[0].message


def test_collapse_evidence_gives_the_early_reference_and_the_state() -> None:
    stream = generate_stream(21, 400, "collapse", onset=200)
    flags = [f for f in detect(History(stream.points()), range(400)) if f.kind == "collapse"]
    assert [f.severity for f in flags if f.severity != "info"][:1] == ["warning"], [(f.step, f.severity) for f in flags]
    first = next(f for f in flags if f.severity == "warning")
    assert first.detector == "entropy_state"
    evidence = first.evidence
    entropy = stream.scalars["policy/entropy"]
    assert evidence["reference"] == pytest.approx(float(np.median(entropy[:5])), rel=1e-6)
    assert evidence["state"] in {"below", "forecast"}
    if evidence["state"] == "forecast":
        assert evidence["forecast"]["confident"] and evidence["corroborated_by"]
        assert f"about {evidence['forecast']['steps_left']} steps" in first.message
    else:
        assert evidence["fraction"] < DEFAULT_PARAMS.collapse.warning_fraction


def test_batching_does_not_change_the_flags() -> None:
    """Evaluating a run in arbitrary batches gives the flags of evaluating it at once."""
    stream = generate_stream(9, 400, "collapse", onset=180)
    whole = detect(History(stream.points()), range(400))
    history = History(stream.points())
    last: dict[str, int] = {}
    pieces = []
    for start, stop in [(0, 7), (7, 150), (150, 181), (181, 182), (182, 400)]:
        pieces += detect(history, range(start, stop), last_flagged=last)
    assert pieces == whole


def test_project_overrides_merge_with_defaults_and_reject_typos() -> None:
    params = DEFAULT_PARAMS.merged({"grad_spike": {"z": 4.0}, "erosion": {"enabled": False}})
    assert params.grad_spike.z == 4.0 and params.grad_spike.min_ratio == DEFAULT_PARAMS.grad_spike.min_ratio
    assert params.erosion.enabled is False and params.collapse.enabled is True
    with pytest.raises(ValidationError, match="zz"):
        DEFAULT_PARAMS.merged({"grad_spike": {"zz": 4.0}})
    stream = generate_stream(21, 400, "erosion", onset=200)
    assert not [k for k, _ in flags_of(stream, params) if k == "erosion"]


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 50))
def test_spike_detection_is_invariant_to_the_metric_unit(scale: float, seed: int) -> None:
    """Robust z on a log scale: multiplying a grad-norm series by a constant changes no flag."""
    rng = np.random.default_rng(seed)
    values = np.exp(rng.normal(0, 0.2, 150))
    values[120] *= 10
    base = {s: float(v) for s, v in enumerate(values)}
    scaled = {s: float(v) * scale for s, v in enumerate(values)}
    only = DEFAULT_PARAMS.merged({k: {"enabled": False} for k in FlagParams.model_fields if k != "grad_spike"})
    a = [(f.kind, f.step) for f in detect(History({"grad/norm": base}), range(150), only)]
    b = [(f.kind, f.step) for f in detect(History({"grad/norm": scaled}), range(150), only)]
    assert a == b
    assert ("grad_spike", 120) in a


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(math.nan)), min_size=1, max_size=9), min_size=1, max_size=6
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_row_median_ignores_nan_like_numpy(rows: list[list[float]]) -> None:
    """The vectorised windows' median equals np.median over each row's non-NaN entries."""
    a = np.array(rows)
    expected = [np.median(r[~np.isnan(r)]) if (~np.isnan(r)).any() else math.nan for r in a]
    np.testing.assert_array_equal(row_nanmedian(a), np.array(expected))


def _trust_region_stream(values: dict[str, list[float]]) -> History:
    """A run whose every step is a later update (update_index 1) with the given values."""
    n = len(next(iter(values.values())))
    points = {key: dict(enumerate(v)) for key, v in values.items()}
    points["train/update_index"] = dict.fromkeys(range(n), 1.0)
    return History(points)


def test_trust_region_needs_no_warm_up_and_fires_once_per_event() -> None:
    clip = [0.25, 0.3, 0.05, 0.05, 0.3] + [0.05] * 300 + [0.3]
    flags = list(detect(_trust_region_stream({"ratio/clip_frac": clip}), range(len(clip))))
    assert [(f.kind, f.step, f.severity) for f in flags] == [
        ("trust_region", 0, "warning"),
        ("trust_region", 305, "warning"),
    ]
    assert flags[0].detector == "bound"
    assert flags[0].evidence["signals"] == [{"key": "ratio/clip_frac", "value": 0.25, "max": 0.2}]


def test_trust_region_with_two_bounds_exceeded_is_critical_and_quiet_below_them() -> None:
    history = _trust_region_stream({"ratio/clip_frac": [0.1, 0.2, 0.3], "grad/update_ratio": [0.005, 0.01, 0.02]})
    flags = detect(history, range(3))
    assert [(f.kind, f.step, f.severity) for f in flags] == [("trust_region", 2, "critical")]
    off = DEFAULT_PARAMS.merged({"trust_region": {"enabled": False}})
    assert not detect(history, range(3), off)


def test_a_hazard_tail_spike_alone_is_informational_and_the_bulk_a_warning() -> None:
    """zeta is bounded (its p99 saturates near 4.61) and MHPO attenuates those tokens: the tail
    reaching the ceiling alone is informational; the mean of zeta moving is a warning."""
    n = 60
    mean, p99 = [1.34] * n, [1.5 + 0.01 * (i % 3) for i in range(n)]
    p99[50] = 4.6
    mean[55] = 2.2
    flags = [
        f
        for f in detect(_trust_region_stream({"hazard/zeta_mean": mean, "hazard/zeta_p99": p99}), range(n))
        if f.kind == "hazard_spike"
    ]
    assert [f.step for f in flags] == [50, 55]
    assert flags[0].severity == "info" and flags[1].severity in ("warning", "critical")


def test_a_critical_after_a_warning_is_an_escalation_and_comes_through() -> None:
    history = _trust_region_stream(
        {"ratio/clip_frac": [0.25, 0.9, 0.9, 0.25], "grad/update_ratio": [0.0, 0.9, 0.9, 0.0]}
    )
    flags = detect(history, range(4))
    assert [(f.step, f.severity) for f in flags] == [(0, "warning"), (1, "critical")]


def test_two_bounds_on_one_key_are_one_signal() -> None:
    params = DEFAULT_PARAMS.merged(
        {"trust_region": {"bounds": [{"key": "ratio/clip_frac", "max": 0.2}, {"key": "ratio/clip_frac", "max": 0.3}]}}
    )
    flags = detect(_trust_region_stream({"ratio/clip_frac": [0.5]}), range(1), params)
    assert [(f.severity, f.evidence["signals"]) for f in flags] == [
        ("warning", [{"key": "ratio/clip_frac", "value": 0.5, "max": 0.2}])
    ]


def test_a_value_that_turns_non_finite_at_an_empty_step_is_flagged_at_the_next_step_with_tokens() -> None:
    nan = float("nan")
    history = History({"grad/update_ratio": {0: nan, 1: nan, 2: nan}, "tokens/valid": {0: 0.0, 1: 10.0, 2: 10.0}})
    flags = detect(history, range(3))
    assert [(f.kind, f.step, f.severity) for f in flags] == [("non_finite", 1, "critical")]


def test_every_kind_comes_from_a_registered_detector() -> None:
    assert {kind for d in DETECTORS.values() for kind in d.instances(DEFAULT_PARAMS)} == set(KINDS)
    with pytest.raises(ValueError, match="already registered"):
        register_detector("drift", instances=lambda fp: {}, judge=lambda *a: None)(lambda s, k, p: None)
    assert DETECTORS["drift"].prepare.__name__ == "_prepare_drift"
