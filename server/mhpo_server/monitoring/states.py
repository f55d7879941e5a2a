"""State detectors: each warning announces a state of the run, defined in the run's own units.

- `collapse`: the policy entropy under a quarter of its early reference (the median of its
  first points) for the last few rollouts, critical under a tenth; or, ahead of that, a
  confident entropy forecast (`mhpo_server.monitoring.forecast`) of the crossing. A rising
  reward softens the message (sharpening may be intended) and holds back the forecast
  warning; it never hides the state.
- `entropy_surge`: the entropy well above its early reference while the reward does not rise
  (informational while it does). A rebound after a dip, back to where the run started, is not
  a surge: the reference is the run's early level, not a window that follows the dip.
- `no_signal`: the run stopped learning: nearly every group's completions got the same reward
  for several rollouts (their group-relative advantages are 0), or the gradient norm and the
  loss are exactly 0 step after step.
- `truncation`: most completions cut at the length limit, or the cut fraction climbing to it.

Each is judged one point per rollout (the rollout's first, on-policy update, where the run logs
`train/update_index`) and announced once per episode: at the point where its state begins or
worsens (warning -> critical), then quiet for the kind's refractory period.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mhpo_server.monitoring.detectors import (
    Flag,
    History,
    Scope,
    StepKinds,
    json_number,
    register_detector,
    subseries,
)
from mhpo_server.monitoring.forecast import (
    EntropyForecast,
    entropy_forecast,
    mann_kendall_z,
    may_be_confident,
    recent_level,
    reference_level,
    theil_sen_slope,
)
from mhpo_server.monitoring.params import (
    COV_KEY,
    CollapseParams,
    NoSignalParams,
    RewardRise,
    SurgeParams,
    TruncationParams,
)

SEVERITY_LEVEL = {"info": 1, "warning": 2, "critical": 3}
EPISODE_GAP = 5  # points (rollouts) a state must stay under a level before reaching it again is a new episode
LEVEL_SEVERITY = {level: name for name, level in SEVERITY_LEVEL.items()}


def rollout_series(history: History, kinds: StepKinds, key: str) -> tuple[np.ndarray, np.ndarray]:
    """One point per rollout of `key`: its finite points of non-empty steps, a rollout-level value
    repeated at every update counted once, and only the first (on-policy) update of each rollout
    where the step's kind is known (`train/update_index`, or the exact-zero log-ratio without it).
    Computed once per key and `kinds` (one `detect` call)."""
    found = kinds.rollouts.get(key)
    if found is None:
        found = kinds.rollouts[key] = _rollout_series(history, kinds, key)
    return found


def _rollout_series(history: History, kinds: StepKinds, key: str) -> tuple[np.ndarray, np.ndarray]:
    parts = subseries(history, kinds, key)
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty(0)
    steps = np.concatenate([s for s, _ in parts])
    values = np.concatenate([v for _, v in parts])
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    known = ~np.isnan(kinds.at("train/update_index", steps))
    known |= ~np.isnan(kinds.at("ratio/min", steps)) & ~np.isnan(kinds.at("ratio/max", steps))
    on = kinds.on_policy(steps)
    if not on.any():  # no step is known to open a rollout (e.g. ratios never exactly 0): every point counts
        return steps, values
    keep = on | ~known
    return steps[keep], values[keep]


@dataclass(frozen=True)
class State:
    """A state detector's judgement at one point: severity level (0 = none) and what it rests on."""

    level: int
    message: str = ""
    evidence: dict[str, Any] | None = None


def _onsets(steps: np.ndarray, at: np.ndarray, judge: Callable[[int], State], first: int) -> dict[int, State]:
    """step -> state, at the evaluated steps that are points of the series where the state begins or worsens.

    `judge(end)` judges the series' first `end` points; `first` is the smallest `end` it can judge. A
    state that flickers (under a threshold, over it, under it again) is one episode: it begins anew
    only after `EPISODE_GAP` points at a lower level.
    """
    out = {}
    idx = np.searchsorted(steps, at)
    for step, i in zip(at.tolist(), idx.tolist(), strict=True):
        if i >= len(steps) or steps[i] != step or i + 1 < first:
            continue
        now = judge(i + 1)
        if now.level and all(judge(end).level < now.level for end in range(i, max(first, i + 1 - EPISODE_GAP) - 1, -1)):
            out[step] = now
    return out


def _reward_change(history: History, kinds: StepKinds, p: RewardRise, step: int) -> tuple[float, float] | None:
    """(earlier, recent) reward at `step`: the Theil-Sen line over the last `window_points` rollouts at
    their first and last point (a line, not two medians: its noise is that of all the points)."""
    steps, values = rollout_series(history, kinds, p.key)
    end = int(np.searchsorted(steps, step, side="right"))
    n = min(end, p.window_points)
    if n < max(3, p.recent_points):
        return None
    window = values[end - n : end]
    index = np.arange(n, dtype=np.float64)
    slope = theil_sen_slope(index, window)
    intercept = float(np.median(window - slope * index))
    return intercept, intercept + slope * (n - 1)


def _reward_since(
    history: History, kinds: StepKinds, p: RewardRise, since: int, step: int
) -> tuple[float, float] | None:
    """(then, recent) reward medians: the `recent_points` rollouts up to step `since`, and the last ones at `step`."""
    steps, values = rollout_series(history, kinds, p.key)
    then_end = int(np.searchsorted(steps, since, side="right"))
    end = int(np.searchsorted(steps, step, side="right"))
    if then_end < 1 or end < then_end + 1:
        return None
    then = values[max(0, then_end - p.recent_points) : then_end]
    recent = values[max(then_end, end - p.recent_points) : end]
    return float(np.median(then)), float(np.median(recent))


def _rising(change: tuple[float, float] | None, p: RewardRise) -> bool:
    return change is not None and change[1] - change[0] >= p.min_abs


def _num(x: float) -> str:
    return f"{x:.3g}"


def _collapse_state(
    history: History,
    kinds: StepKinds,
    p: CollapseParams,
    steps: np.ndarray,
    values: np.ndarray,
    end: int,
    reference: float | None,
) -> State:
    """The state at the series' first `end` points; `reference`: its early level (`reference_level`)."""
    f = p.forecast
    if end < f.reference_points + max(f.recent_points, p.hold_points):
        return State(0)
    if reference is None or reference <= 0:
        return State(0)
    level = float(np.max(values[end - p.hold_points : end]))  # each of the last `hold_points` is at most this
    fraction = level / reference
    if fraction >= p.warning_fraction and not (p.forecast_warning and may_be_confident(values, end, reference, f)):
        return State(0)  # neither state can hold: the forecast and the evidence are not computed
    step = int(steps[end - 1])
    cov = history.series(COV_KEY)
    forecast = entropy_forecast(steps, values, end, reference, f, cov)
    reward = _reward_change(history, kinds, p.reward_rise, step)
    rising = _rising(reward, p.reward_rise)
    evidence: dict[str, Any] = {
        "key": p.key,
        "reference": json_number(reference),
        "reference_steps": [int(steps[0]), int(steps[f.reference_points - 1])],
        "level": json_number(level),
        "fraction": json_number(fraction),
        "thresholds": {"warning": p.warning_fraction, "critical": p.critical_fraction},
        "forecast": None if forecast is None else _forecast_evidence(forecast),
        "reward": None if reward is None else {"before": json_number(reward[0]), "recent": json_number(reward[1])},
        "reward_rising": rising,
    }
    soften = (
        f" The reward rose from {_num(reward[0])} to {_num(reward[1])} meanwhile: the policy may be sharpening on"
        " purpose, but it has little left to explore."
        if rising and reward is not None
        else ""
    )
    if fraction < p.warning_fraction:
        level_no = SEVERITY_LEVEL["critical" if fraction < p.critical_fraction else "warning"]
        bound = "a tenth" if fraction < p.critical_fraction else "a quarter"
        message = (
            f"Entropy collapse: policy entropy is at most {_num(level)}, {100 * fraction:.0f}% of its early level"
            f" {_num(reference)} (under {bound}), in each of the last {p.hold_points} rollouts; the policy is"
            f" converging on few answers.{soften}"
        )
        return State(level_no, message, {**evidence, "state": "below"})
    if p.forecast_warning and forecast is not None and forecast.confident:
        assert forecast.steps_left is not None
        views = _corroborating(history, kinds, p, steps[max(0, end - f.trend_points)], step)
        if forecast.cov is not None and forecast.cov > 0:
            views.insert(0, f"{COV_KEY} > 0")
        message = (
            f"Entropy on course to collapse: {_num(forecast.level)}, {100 * forecast.fraction:.0f}% of its early level"
            f" {_num(reference)}, falling {_num(-forecast.slope)} per step; at this pace it is under a quarter"
            f" of that level in about {forecast.steps_left} steps (step {forecast.crossing_step})."
        )
        evidence = {**evidence, "state": "forecast", "corroborated_by": views}
        if rising:
            return State(SEVERITY_LEVEL["info"], message + soften, evidence)
        if not views:
            return State(SEVERITY_LEVEL["info"], message + " Entropy alone: no second view confirms it yet.", evidence)
        return State(SEVERITY_LEVEL["warning"], message + f" Confirmed by {', '.join(views)}.", evidence)
    return State(0)


def _corroborating(history: History, kinds: StepKinds, p: CollapseParams, first: int, last: int) -> list[str]:
    """The `corroborate` views trending with the collapse over steps [first, last]."""
    found = []
    for view in p.corroborate:
        steps, values = rollout_series(history, kinds, view.key)
        window = values[(steps >= first) & (steps <= last)]
        z = mann_kendall_z(window)
        if (z <= -p.forecast.z) if view.direction == "down" else (z >= p.forecast.z):
            found.append(f"{view.key} {'falling' if view.direction == 'down' else 'rising'}")
    return found


def _forecast_evidence(forecast: EntropyForecast) -> dict[str, Any]:
    return {
        "slope": json_number(forecast.slope),
        "z": json_number(forecast.z),
        "cov": None if forecast.cov is None else json_number(forecast.cov),
        "steps_left": forecast.steps_left,
        "crossing_step": forecast.crossing_step,
        "accelerating": forecast.accelerating,
        "confident": forecast.confident,
    }


def _surge_state(
    history: History,
    kinds: StepKinds,
    p: SurgeParams,
    steps: np.ndarray,
    values: np.ndarray,
    end: int,
    reference: float | None,
) -> State:
    if reference is None or end < p.reference_points + p.recent_points:
        return State(0)
    level = recent_level(values, end, p.recent_points)
    if level < p.ratio * reference or level - reference < p.min_abs:
        return State(0)
    # The climb began at the last point at or under the reference, looked for no further back than
    # `window_points` rollouts (what the server keeps of a long run), so every path agrees.
    start = max(p.reference_points - 1, end - 1 - p.reward_rise.window_points)
    calm = np.flatnonzero(values[start:end] <= reference)
    since = int(steps[start + calm[-1]]) if len(calm) else int(steps[start])
    reward = _reward_since(history, kinds, p.reward_rise, since, int(steps[end - 1]))
    rising = _rising(reward, p.reward_rise)
    evidence = {
        "key": p.key,
        "reference": json_number(reference),
        "level": json_number(level),
        "ratio": json_number(level / reference if reference > 0 else math.inf),
        "thresholds": {"ratio": p.ratio, "min_abs": p.min_abs},
        "reward": None if reward is None else {"before": json_number(reward[0]), "recent": json_number(reward[1])},
        "reward_rising": rising,
    }
    times = f"{level / reference:.1f}x" if reference > 0 else "far above"
    reward_text = "" if reward is None else f" (reward {_num(reward[0])} -> {_num(reward[1])})"
    if rising:
        message = (
            f"Entropy up with the reward: {_num(level)}, {times} its early level {_num(reference)}, and the"
            f" reward rose since the entropy began climbing{reward_text}: exploration that pays, not a surge."
        )
        return State(SEVERITY_LEVEL["info"], message, evidence)
    message = (
        f"Entropy surge: policy entropy is {_num(level)}, {times} its early level {_num(reference)}, and the"
        f" reward has not risen since it began climbing{reward_text}: the policy is drifting towards random"
        " text."
    )
    return State(SEVERITY_LEVEL["warning"], message, evidence)


def _degenerate_state(p: NoSignalParams, values: np.ndarray, end: int) -> State:
    window = values[end - p.degenerate_points : end]
    if end < p.degenerate_points or not bool(np.all(window >= p.degenerate_frac)):
        return State(0)
    message = (
        f"No learning signal: {100 * float(np.min(window)):.0f}% or more of the groups gave every completion the same"
        f" reward in each of the last {p.degenerate_points} rollouts, so their advantages are 0 and the update"
        " learns nothing from them (the task is too hard or already solved for this policy; a larger group or"
        " another temperature may bring variance back)."
    )
    evidence = {
        "key": p.degenerate_key,
        "values": [json_number(float(v)) for v in window],
        "threshold": p.degenerate_frac,
        "points": p.degenerate_points,
    }
    return State(SEVERITY_LEVEL["warning"], message, evidence)


def _zero_state(p: NoSignalParams, series: list[tuple[np.ndarray, np.ndarray]], step: int) -> State:
    """Every zero key exactly 0 at each of its last `zero_points` points at or before `step`, logged at `step`."""
    for steps, values in series:
        end = int(np.searchsorted(steps, step, side="right"))
        if end < p.zero_points or steps[end - 1] != step or bool(np.any(values[end - p.zero_points : end] != 0.0)):
            return State(0)
    message = (
        f"No learning signal: {' and '.join(p.zero_keys)} exactly 0 at each of the last {p.zero_points} steps: the"
        " updates are no-ops (e.g. every completion truncated with reward 0, or every advantage 0)."
    )
    return State(SEVERITY_LEVEL["warning"], message, {"keys": list(p.zero_keys), "points": p.zero_points})


def _truncation_state(p: TruncationParams, values: np.ndarray, end: int, reference: float | None) -> State:
    if end < p.recent_points:
        return State(0)
    level = recent_level(values, end, p.recent_points)
    least = float(np.min(values[end - p.recent_points : end]))
    evidence: dict[str, Any] = {"key": p.key, "level": json_number(level), "max_frac": p.max_frac}
    if least > p.max_frac:
        message = (
            f"Truncation: {100 * least:.0f}% or more of the completions were cut at the length limit in each of"
            f" the last {p.recent_points} rollouts; their rewards judge unfinished answers (raise the completion"
            " length limit, or penalise length)."
        )
        return State(SEVERITY_LEVEL["warning"], message, {**evidence, "state": "most"})
    if reference is None or end < p.reference_points + p.trend_points:
        return State(0)
    z = mann_kendall_z(values[end - p.trend_points : end])
    if level >= p.climb_frac and level - reference >= p.climb_abs and z >= p.z:
        message = (
            f"Truncation climbing: {100 * level:.0f}% of the completions now hit the length limit, up from"
            f" {100 * reference:.0f}% early in the run; the completions are growing into the limit."
        )
        return State(SEVERITY_LEVEL["warning"], message, {**evidence, "reference": json_number(reference), "z": z})
    return State(0)


def _flag(kind: str, step: int, state: State | None, detector: str) -> Flag | None:
    if state is None:
        return None
    return Flag(
        step=step,
        kind=kind,
        severity=LEVEL_SEVERITY[state.level],
        detector=detector,
        message=state.message,
        evidence=state.evidence or {},
    )


def register_state(
    name: str, kind: str
) -> Callable[[Callable[[Scope, str, Any], Any]], Callable[[Scope, str, Any], Any]]:
    """Register a state detector: its `prepare` gives step -> `State` at the onsets; one flag per
    episode (the kind's `refractory_steps`)."""
    return register_detector(
        name,
        instances=lambda fp: {kind: getattr(fp, kind)},
        judge=lambda _s, k, _p, table, step: _flag(k, step, table.get(step), name),
        hold=lambda p: p.refractory_steps,
    )


@register_state("entropy_state", "collapse")
def _prepare_collapse(s: Scope, _kind: str, p: CollapseParams) -> dict[int, State]:
    steps, values = rollout_series(s.history, s.kinds, p.key)
    first = p.forecast.reference_points + max(p.forecast.recent_points, p.hold_points)
    reference = reference_level(values, p.forecast.reference_points)
    return _onsets(
        steps, s.at, lambda end: _collapse_state(s.history, s.kinds, p, steps, values, end, reference), first
    )


@register_state("entropy_level", "entropy_surge")
def _prepare_surge(s: Scope, _kind: str, p: SurgeParams) -> dict[int, State]:
    steps, values = rollout_series(s.history, s.kinds, p.key)
    first = p.reference_points + p.recent_points
    reference = reference_level(values, p.reference_points)
    return _onsets(steps, s.at, lambda end: _surge_state(s.history, s.kinds, p, steps, values, end, reference), first)


@register_state("learning_signal", "no_signal")
def _prepare_no_signal(s: Scope, _kind: str, p: NoSignalParams) -> dict[int, State]:
    steps, values = rollout_series(s.history, s.kinds, p.degenerate_key)
    table = _onsets(steps, s.at, lambda end: _degenerate_state(p, values, end), p.degenerate_points)
    zero = []
    for key in p.zero_keys:
        found = s.history.series(key)
        if found is None:
            return table
        keep = np.isfinite(found[1]) & ~s.kinds.empty(found[0])
        zero.append((found[0][keep], found[1][keep]))
    base_steps = zero[0][0]
    judged = _onsets(
        base_steps,
        s.at,
        lambda end: _zero_state(p, zero, int(base_steps[end - 1])),
        p.zero_points,
    )
    for step, state in judged.items():
        table.setdefault(step, state)
    return table


@register_state("length_limit", "truncation")
def _prepare_truncation(s: Scope, _kind: str, p: TruncationParams) -> dict[int, State]:
    steps, values = rollout_series(s.history, s.kinds, p.key)
    reference = reference_level(values, p.reference_points)
    return _onsets(steps, s.at, lambda end: _truncation_state(p, values, end, reference), p.recent_points)


def latest_forecast(history: History, p: CollapseParams) -> EntropyForecast | None:
    """The entropy forecast at the run's latest rollout point (what the run page shows as its entropy
    budget), or None before the run has `reference_points + trend_points` rollouts of entropy."""
    kinds = StepKinds(history)
    steps, values = rollout_series(history, kinds, p.key)
    reference = reference_level(values, p.forecast.reference_points)
    if reference is None:
        return None
    return entropy_forecast(steps, values, len(steps), reference, p.forecast, history.series(COV_KEY))
