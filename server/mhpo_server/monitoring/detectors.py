"""Flag detectors: pure, deterministic functions of a run's recent scalar history.

`detect(history, steps, params)` evaluates every detector at each step of `steps` using
only the points logged at or before that step, so the flags of a run do not depend on
how its records were batched, nor on which server process evaluates them. Windows count
logged points (not step numbers), so a run that logs every 10th step gets the same
behaviour as one that logs every step.

Rules every detector keeps:
- Like with like. The log-ratio, hazard, gradient and policy-KL statistics of an
  on-policy step (the first update of a rollout: `train/update_index` 0, or, without it,
  `ratio/min` = `ratio/max` = 0 exactly) are compared only with on-policy steps, those of
  later updates only with later updates (`same_kind_only`).
- Empty steps (`tokens/valid` = 0) are data, not a signal: they enter no window and
  nothing is flagged at them.
- Minimum meaningful changes. Each signal's move must exceed a floor in its own units and
  relative to its reference (`mhpo_server.monitoring.params`), besides a noise z-score, so a
  constant baseline cannot turn an ordinary value into z = 10^4.

Each detector is registered (`register_detector`, as the losses are) in `DETECTORS`, which
`detect` runs in order. Detectors (kind: detector name):
- `collapse`, `entropy_surge`, `no_signal`, `truncation`: state detectors
  (`mhpo_server.monitoring.states`), each announcing a state of the run in its own units
  against the run's early reference, once per episode.
- `erosion` and the drift half of `kl_spike`: `drift`, a vote among independent signals.
  Each signal is judged by two tests: a level test (median of the last few points vs the median of the window before them) and a trend
  test (Theil-Sen slope over a window, i.e. the decline a sliding baseline would follow). The z of both uses the
  noise of the step-to-step differences, which a steady trend does not inflate. A signal
  votes when one test passes, or both are meaningful and at `AGREE` of the z threshold.
  One flag per event and severity (refractory period).
- `trust_region`: `bound`, absolute bounds (clip fraction, update-to-weight ratio) that
  need no baseline, so a run that breaks down in its first rollouts is flagged there.
- `hazard_spike`, `grad_spike`, `kl_spike`: `robust_z`, a one-step robust z-score (log
  scale) vs the rolling median/MAD of the previous points; fires at the onset.
- `mismatch`: `band`, absolute bands on the sampler-vs-trainer statistics (`mismatch/*`, what
  TRL's `sampling/*` and verl's `rollout_corr/*` map onto), and `log_drift`, a key's recent
  level against its own earlier low on a log scale; the idle-clip invariant (every clip fraction
  exactly 0 while the gap grows) lowers the drift's ratio and raises the severity.
- `non_finite`: `non_finite_scan`, a scalar that turns NaN or +-Infinity.
- `on_policy`: `exact_ratio`, the log-ratio is exactly 0 for several steps in a row
  (informational: one update per rollout, ratio diagnostics carry no information).

Why not a drift library: river's detectors (ADWIN, Page-Hinkley, KSWIN) flag any change
of the mean in either direction with thresholds in no unit of the signal, keep per-stream
state that every server process would have to share and replay in order (KSWIN also
samples at random), and Page-Hinkley's reference is the running mean of the whole stream,
which a healthy run's own slow trend moves; ruptures segments a whole signal offline
(PELT/BinSeg with a penalty), which re-run on every batch is neither incremental nor
in signal units. The two windowed tests here are a few medians per step, exactly
reproducible from the stored points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mhpo_server.monitoring.params import (
    DEFAULT_PARAMS,
    Bound,
    DriftParams,
    FlagParams,
    MismatchParams,
    NonFiniteParams,
    OnPolicyParams,
    Signal,
    SpikeParams,
    TrustRegionParams,
)
from mhpo_server.monitoring.stats import row_nanmedian, row_robust_z, row_sigma

KINDS = (
    "collapse",
    "erosion",
    "entropy_surge",
    "no_signal",
    "truncation",
    "trust_region",
    "mismatch",
    "hazard_spike",
    "grad_spike",
    "kl_spike",
    "non_finite",
    "on_policy",
)
KIND_DETECTORS: dict[str, tuple[str, ...]] = {  # kind -> the detector names its flags carry
    "collapse": ("entropy_state",),
    "erosion": ("drift",),
    "entropy_surge": ("entropy_level",),
    "no_signal": ("learning_signal",),
    "truncation": ("length_limit",),
    "trust_region": ("bound",),
    "mismatch": ("band", "log_drift"),
    "hazard_spike": ("robust_z",),
    "grad_spike": ("robust_z",),
    "kl_spike": ("drift", "robust_z"),
    "non_finite": ("non_finite_scan",),
    "on_policy": ("exact_ratio",),
}
# What a drift flag announces, in the words its message opens with.
DRIFT_MEANING = {
    "erosion": "Policy erosion (the sampled tokens' probabilities contracting)",
    "kl_spike": "Policy KL drifting up",
}
SAME_KIND_PREFIXES = ("ratio/", "hazard/", "grad/", "policy/kl_k")
AGREE = 0.8  # both tests meaningful and at >= 0.8 of the z threshold: two tests agreeing are one vote


@dataclass(frozen=True)
class Flag:
    """One detection; `as_event()` is the row for `store.add_events` (contract C6)."""

    step: int
    kind: str
    severity: str
    detector: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_event(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "kind": self.kind,
            "severity": self.severity,
            "detector": self.detector,
            "message": self.message,
            "evidence": self.evidence,
        }


class History:
    """Scalar points of one run by key, sorted by step (later values for a step win)."""

    def __init__(self, points: Mapping[str, Mapping[int, float]]) -> None:
        self._steps: dict[str, np.ndarray] = {}
        self._values: dict[str, np.ndarray] = {}
        for key, by_step in points.items():
            if not by_step:
                continue
            steps = np.fromiter(sorted(by_step), dtype=np.int64, count=len(by_step))
            self._steps[key] = steps
            self._values[key] = np.fromiter((by_step[s] for s in steps.tolist()), dtype=np.float64, count=len(steps))

    @classmethod
    def from_arrays(cls, series: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> History:
        """From (steps, values) arrays per key, steps strictly ascending (no copy, no sort)."""
        history = cls({})
        for key, (steps, values) in series.items():
            if len(steps):
                history._steps[key] = steps
                history._values[key] = values
        return history

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, int, float]]) -> History:
        points: dict[str, dict[int, float]] = {}
        for key, step, value in rows:
            points.setdefault(key, {})[int(step)] = float(value)
        return cls(points)

    def keys(self) -> list[str]:
        return list(self._steps)

    def upto(self, key: str, step: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(steps, values) of `key` at or before `step`, or None when `key` is not logged at `step`."""
        steps = self._steps.get(key)
        if steps is None:
            return None
        idx = int(np.searchsorted(steps, step, side="right"))
        if idx == 0 or steps[idx - 1] != step:
            return None
        return steps[:idx], self._values[key][:idx]

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """All (steps, values) of `key`, or None when it is not logged."""
        steps = self._steps.get(key)
        return None if steps is None else (steps, self._values[key])

    def value(self, key: str, step: int) -> float | None:
        found = self.upto(key, step)
        return None if found is None else float(found[1][-1])


def json_number(x: float) -> float | str:
    """A JSON-safe number: non-finite values become the strings "NaN", "Infinity", "-Infinity"."""
    if math.isfinite(x):
        return round(x, 9)
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _take(values: np.ndarray, ends: np.ndarray, length: int, offset: int = 0) -> np.ndarray:
    """(len(ends), length) matrix: row i holds values[ends[i] - offset - length : ends[i] - offset], NaN-padded."""
    pad = length + offset
    padded = np.concatenate([np.full(pad, np.nan), values])
    return padded[(ends + pad - offset - length)[:, None] + np.arange(length)]


def lookup(history: History, key: str, steps: np.ndarray) -> np.ndarray:
    """The value of `key` at each of `steps`, NaN where it is not logged."""
    found = history.series(key)
    out = np.full(len(steps), np.nan)
    if found is None or not len(steps):
        return out
    key_steps, values = found
    idx = np.minimum(np.searchsorted(key_steps, steps), len(key_steps) - 1)  # never negative; cheaper than clip
    hit = key_steps[idx] == steps
    out[hit] = values[idx[hit]]
    return out


class StepKinds:
    """What kind of optimizer step each logged step is: on-policy or a later update, empty or not.

    On-policy: `train/update_index` is 0 (the first update of a rollout, every importance
    ratio exactly 1); a record without it counts as on-policy when `ratio/min` and
    `ratio/max` are both exactly 0 (no token moved, which only happens before any update).
    Empty: `tokens/valid` is 0 (no valid token, e.g. every completion truncated).
    """

    def __init__(self, history: History) -> None:
        self.history = history
        # key -> its one-point-per-rollout series (`states.rollout_series`), computed once per `detect` call
        self.rollouts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # (key, steps) -> `lookup`: the keys of one trainer share their steps, so each signal asks for the same
        self._lookups: dict[tuple[str, bytes], np.ndarray] = {}

    def at(self, key: str, steps: np.ndarray) -> np.ndarray:
        """`lookup(history, key, steps)`, computed once per set of steps (the result is shared: do not modify it)."""
        cache_key = (key, steps.tobytes())
        found = self._lookups.get(cache_key)
        if found is None:
            found = self._lookups[cache_key] = lookup(self.history, key, steps)
        return found

    def on_policy(self, steps: np.ndarray) -> np.ndarray:
        index = self.at("train/update_index", steps)
        low = self.at("ratio/min", steps)
        high = self.at("ratio/max", steps)
        return np.where(np.isnan(index), (low == 0.0) & (high == 0.0), index == 0.0)

    def empty(self, steps: np.ndarray) -> np.ndarray:
        return self.at("tokens/valid", steps) == 0.0


def same_kind_only(key: str) -> bool:
    """Whether `key` is judged only against steps of its own kind (on-policy vs later updates).

    The log-ratio, hazard, gradient and policy-KL statistics of an on-policy step are
    exact constants (x = 0) or systematically different, so they never feed the baseline
    of a later update, nor the reverse.
    """
    return key.startswith(SAME_KIND_PREFIXES)


def subseries(history: History, kinds: StepKinds, key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (steps, values) series a signal is judged on: finite points of non-empty steps, split by kind when needed."""
    found = history.series(key)
    if found is None:
        return []
    steps, values = found
    keep = np.isfinite(values) & ~kinds.empty(steps)
    steps, values = steps[keep], values[keep]
    # A value repeated exactly within a rollout (a rollout-level scalar such as the reward,
    # streamed with every update of the rollout) is one observation: keep its first step.
    rollout = kinds.at("train/rollout", steps)
    first = np.concatenate([[True], (values[1:] != values[:-1]) | ~(rollout[1:] == rollout[:-1])])
    steps, values = steps[first], values[first]
    if not same_kind_only(key):
        return [(steps, values)]
    on = kinds.on_policy(steps)
    return [(steps[on], values[on]), (steps[~on], values[~on])]


def _evaluated(steps: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the evaluated steps present in `steps`, their exclusive end index in `steps`)."""
    if not len(steps):
        return at[:0], np.empty(0, dtype=np.int64)
    idx = np.searchsorted(steps, at, side="right")
    present = (idx > 0) & (steps[np.maximum(idx - 1, 0)] == at)
    return at[present], idx[present]


def _noise(values: np.ndarray, ends: np.ndarray, length: int, lag: int) -> np.ndarray:
    """Robust per-point noise sigma from the lag-`lag` differences of the last `length` points.

    A steady trend shifts every difference by the same amount, which the median absolute
    deviation ignores, so the noise of a declining series is not mistaken for its decline.
    The lag (half the trend window) spans the updates of a rollout, which share their
    samples so that neighbours move together, and part of a noisy series' slow wander.
    Exactly-zero differences carry no noise information and are left out. Fewer than
    `lag` + 1 points give NaN (no noise estimate; the minimum change alone decides).
    """
    if len(values) <= lag:
        return np.full(len(ends), np.nan)
    diffs = np.concatenate([np.full(lag, np.nan), values[lag:] - values[:-lag]])
    diffs[diffs == 0.0] = np.nan
    rows = _take(diffs, ends, length - 1)
    return row_sigma(rows)[1] / math.sqrt(2.0)


_PAIRS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _theil_sen(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, intercept at the first point) of each row: median of the pairwise slopes (Theil-Sen)."""
    n = rows.shape[1]
    if n not in _PAIRS:
        i, j = np.triu_indices(n, k=1)
        _PAIRS[n] = (i, j)
    i, j = _PAIRS[n]
    slopes = (rows[:, j] - rows[:, i]) / (j - i)
    slope = np.median(slopes, axis=1)
    intercept = np.median(rows - slope[:, None] * np.arange(n), axis=1)
    return slope, intercept


@dataclass(frozen=True)
class _Judged:
    """One signal's two tests at one step."""

    level: float
    baseline: float
    trend_change: float
    trend_ref: float
    noise: float
    points: int
    trend_ok: bool


def _drift_rows(
    steps: np.ndarray, values: np.ndarray, at: np.ndarray, p: DriftParams, min_points: int
) -> dict[int, _Judged]:
    """step -> the statistics of both tests, for the evaluated steps with at least `min_points` baseline points."""
    judged_at, ends = _evaluated(steps, at)
    ok = ends >= min_points + p.recent_steps
    judged_at, ends = judged_at[ok], ends[ok]
    if not len(ends):
        return {}
    r, b, t = p.recent_steps, p.baseline_steps, p.trend_steps
    level = row_nanmedian(_take(values, ends, r))
    base_rows = _take(values, ends, b, offset=r)
    baseline = row_nanmedian(base_rows)
    count = np.sum(~np.isnan(base_rows), axis=1)
    noise = _noise(values, ends, max(b + r, t), max(r, t // 2))
    full = ends >= t
    slope, intercept = np.full(len(ends), np.nan), np.full(len(ends), np.nan)
    if full.any():
        slope[full], intercept[full] = _theil_sen(_take(values, ends[full], t))
    out = {}
    for i, step in enumerate(judged_at.tolist()):
        out[step] = _Judged(
            level=float(level[i]),
            baseline=float(baseline[i]),
            trend_change=float(slope[i] * (t - 1)),
            trend_ref=float(intercept[i]),
            noise=float(noise[i]),
            points=int(count[i]),
            trend_ok=bool(full[i]),
        )
    return out


def _tests(sig: Signal, row: _Judged, p: DriftParams) -> list[tuple[str, float, float, float, float, bool]]:
    """(test, value, reference, change in the signal's direction, z, vote) of the level and trend tests.

    Two tests that both see a meaningful change at `AGREE` of the z threshold vote together: a
    steady decline just past its onset is seen by both at once before either is sure alone.
    """
    sign = 1.0 if sig.direction == "up" else -1.0
    noise = row.noise if math.isfinite(row.noise) else 0.0
    candidates = [
        (
            "level",
            row.level,
            row.baseline,
            sign * (row.level - row.baseline),
            noise * 1.2533 * math.sqrt(1.0 / p.recent_steps + 1.0 / max(row.points, 1)),
        )
    ]
    if row.trend_ok:
        t = p.trend_steps
        se = 1.05 * noise * (t - 1) * math.sqrt(12.0 / (t * (t * t - 1)))
        candidates.append(("trend", row.trend_ref + row.trend_change, row.trend_ref, sign * row.trend_change, se))
    judged = []
    for name, value, reference, change, se in candidates:
        z = change / se if se > 0 else (math.inf if change > 0 else 0.0)
        meaningful = change > 0 and change >= max(sig.min_abs, sig.min_rel * abs(reference))
        judged.append((name, value, reference, change, z, meaningful))
    agree = len(judged) == 2 and all(meaningful and z >= AGREE * sig.z for *_, z, meaningful in judged)
    return [
        (name, value, reference, change, z, meaningful and (z >= sig.z or agree))
        for name, value, reference, change, z, meaningful in judged
    ]


def _votes(sig: Signal, row: _Judged, p: DriftParams) -> bool:
    return any(t[-1] for t in _tests(sig, row, p))


def _evidence(sig: Signal, row: _Judged, p: DriftParams) -> dict[str, Any]:
    """The evidence of one signal at one step: the voting test, else the one with the larger z."""
    name, value, reference, change, z, vote = max(_tests(sig, row, p), key=lambda t: (t[-1], t[-2]))
    return {
        "key": sig.key,
        "direction": sig.direction,
        "test": name,
        "value": json_number(value),
        "baseline": json_number(reference),
        "change": json_number(change),
        "change_rel": json_number(change / abs(reference) if reference != 0 else math.inf),
        "noise": json_number(row.noise),
        "z": json_number(z),
        "threshold": {"min_abs": sig.min_abs, "min_rel": sig.min_rel, "z": sig.z},
        "vote": vote,
    }


def _drift_tables(
    history: History, kinds: StepKinds, signals: tuple[Signal, ...], p: DriftParams, at: np.ndarray, guard: bool
) -> list[dict[int, _Judged]]:
    """Per signal, step -> its statistics at the evaluated steps where it is logged.

    A guard (`unless`) signal is judged from fewer points (it only vetoes) and at every
    evaluated step, from its latest point at or before it: a reward streamed once per
    rollout still vetoes at the later updates of the rollout.
    """
    tables = []
    for sig in signals:
        table: dict[int, _Judged] = {}
        for steps, values in subseries(history, kinds, sig.key):
            if not guard:
                table.update(_drift_rows(steps, values, at, p, p.min_baseline))
                continue
            rows = _drift_rows(steps, values, steps, p, max(3, p.min_baseline // 3))
            idx = np.searchsorted(steps, at, side="right") - 1
            for step, i in zip(at.tolist(), idx.tolist(), strict=True):
                if i >= 0 and int(steps[i]) in rows:
                    table[step] = rows[int(steps[i])]
        tables.append(table)
    return tables


def _drift(
    kind: str, p: DriftParams, tables: list[dict[int, _Judged]], unless: list[dict[int, _Judged]], step: int
) -> Flag | None:
    """The flag of a drift detector at `step`, or None."""
    judged = [(sig, table[step]) for sig, table in zip(p.signals, tables, strict=True) if step in table]
    if not judged:
        return None
    voting = [(sig, row) for sig, row in judged if _votes(sig, row, p)]
    needed = min(p.min_votes, len(judged))
    if len(voting) < needed:
        return None
    guards = [(sig, table[step]) for sig, table in zip(p.unless, unless, strict=True) if step in table]
    vetoed = any(_votes(sig, row, p) for sig, row in guards)
    if vetoed and p.vetoed == "silent":
        return None
    votes = [_evidence(sig, row, p) for sig, row in voting]
    independent = len({sig.family or sig.key for sig, _ in voting})
    if vetoed:
        severity = "info"
    elif len(votes) >= p.critical_votes and independent >= p.warning_votes:
        severity = "critical"
    elif independent >= p.warning_votes:
        severity = "warning"
    else:
        severity = "info"
    how = {"level": "its recent level against the window before", "trend": f"over its last {p.trend_steps} points"}
    parts = "; ".join(
        f"{e['key']} {'rose' if e['direction'] == 'up' else 'fell'} {100 * abs(float(e['change_rel'])):.0f}%"
        f" ({how[e['test']]})"
        for e in votes
    )
    agree = "one signal alone" if independent == 1 else f"{independent} independent signals agree"
    return Flag(
        step=step,
        kind=kind,
        severity=severity,
        detector=KIND_DETECTORS[kind][0],
        message=f"{DRIFT_MEANING.get(kind, kind)}: {parts}; {agree}"
        f"{'; the reward is rising, so this is informational' if vetoed else ''}.",
        evidence={
            "signals": [_evidence(sig, row, p) for sig, row in judged],
            "unless": [_evidence(sig, row, p) for sig, row in guards],
            "votes": len(votes),
            "independent_votes": independent,
            "needed": needed,
            "window": {
                "baseline_steps": p.baseline_steps,
                "recent_steps": p.recent_steps,
                "trend_steps": p.trend_steps,
            },
        },
    )


def _spike_table(
    history: History, kinds: StepKinds, key: str, p: SpikeParams, at: np.ndarray
) -> dict[int, dict[str, Any]]:
    """step -> evidence for the steps where `key` starts an excursion (fires now, not at its previous point)."""
    table = {}
    for steps, values in subseries(history, kinds, key):
        judged_at, ends = _evaluated(steps, at)
        if not len(ends):
            continue
        f = values
        if p.log_scale:
            with np.errstate(divide="ignore", invalid="ignore"):
                f = np.where(values > 0, np.log(np.where(values > 0, values, 1.0)), np.nan)
        both = np.concatenate([ends, ends - 1])
        rows = _take(f, both, p.window_steps, offset=1)
        enough = np.sum(~np.isnan(rows), axis=1) >= p.min_baseline
        z, centre, _scale = row_robust_z(_take(f, both, 1)[:, 0], rows, p.min_scale)
        raw = _take(values, both, 1)[:, 0]
        baseline = np.exp(centre) if p.log_scale else centre
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(baseline > 0, raw / baseline, np.inf)
        fired = enough & (z > p.z) & (ratio >= p.min_ratio) & (raw - baseline >= p.min_abs) & (both > 0)
        m = len(ends)
        onset = fired[:m] & ~fired[m:]
        for i in np.flatnonzero(onset).tolist():
            table[int(judged_at[i])] = {
                "key": key,
                "value": json_number(float(raw[i])),
                "baseline": json_number(float(baseline[i])),
                "ratio": json_number(float(ratio[i])),
                "z": json_number(float(z[i])),
                "threshold": {
                    "z": p.z,
                    "min_ratio": p.min_ratio,
                    "min_abs": p.min_abs,
                    "min_scale": p.min_scale,
                    "log_scale": p.log_scale,
                },
            }
    return table


def _spike(kind: str, p: SpikeParams, tables: list[dict[int, dict[str, Any]]], step: int) -> Flag | None:
    hits = [table[step] for table in tables if step in table]
    if not hits:
        return None
    if all(h["key"] in p.info_keys for h in hits):
        severity = "info"
    else:
        severity = "critical" if any(float(h["z"]) >= p.critical_z for h in hits) else "warning"
    parts = ", ".join(
        f"{h['key']} = {float(h['value']):.4g} ({float(h['ratio']):.1f}x baseline, z={float(h['z']):.1f})" for h in hits
    )
    return Flag(
        step=step,
        kind=kind,
        severity=severity,
        detector=KIND_DETECTORS[kind][-1],
        message=f"{kind}: {parts}",
        evidence={"signals": hits, "window_steps": p.window_steps},
    )


def _bound_table(history: History, bounds: tuple[Bound, ...], at: np.ndarray) -> dict[int, list[dict[str, Any]]]:
    """step -> the bounds exceeded at that step (key, value, bound; a key's tightest bound only)."""
    table: dict[int, list[dict[str, Any]]] = {}
    for key in dict.fromkeys(b.key for b in bounds):
        bound = min(b.max for b in bounds if b.key == key)
        values = lookup(history, key, at)
        for i in np.flatnonzero(values > bound).tolist():
            table.setdefault(int(at[i]), []).append({"key": key, "value": float(values[i]), "max": bound})
    return table


def _text(value: float) -> str:
    """A value for a message: 4 significant digits, non-finite values as JSON spells them."""
    return f"{value:.4g}" if math.isfinite(value) else str(json_number(value))


def _trust_region(table: dict[int, list[dict[str, Any]]], step: int) -> Flag | None:
    hits = table.get(step)
    if not hits:
        return None
    parts = ", ".join(f"{h['key']} = {_text(h['value'])} > {h['max']:g}" for h in hits)
    return Flag(
        step=step,
        kind="trust_region",
        severity="critical" if len({h["key"] for h in hits}) >= 2 else "warning",
        detector=KIND_DETECTORS["trust_region"][0],
        message=f"trust_region: {parts} (the update left the loss's trust region)",
        evidence={"signals": [{**h, "value": json_number(h["value"])} for h in hits]},
    )


def _band_hits(history: History, p: MismatchParams, at: np.ndarray) -> dict[int, list[dict[str, Any]]]:
    """step -> the `mismatch` bands a logged value is outside of at that step."""
    table: dict[int, list[dict[str, Any]]] = {}
    for band in p.bands:
        values = lookup(history, band.key, at)
        judged = np.abs(values) if band.absolute else values
        with np.errstate(invalid="ignore"):
            out = np.zeros(len(at), dtype=bool)
            if band.above is not None:
                out |= judged >= band.above
            if band.below is not None:
                out |= judged < band.below
        for i in np.flatnonzero(out).tolist():
            table.setdefault(int(at[i]), []).append(
                {
                    "key": band.key,
                    "value": json_number(float(values[i])),
                    "band": {"below": band.below, "above": band.above, "absolute": band.absolute},
                    "severity": band.severity,
                    "meaning": band.meaning,
                }
            )
    return table


def _growth_table(
    history: History, kinds: StepKinds, p: MismatchParams, at: np.ndarray
) -> dict[int, list[dict[str, Any]]]:
    """step -> per growth key logged there: its recent level, its reference (earlier low) and their ratio.

    Reference: the lowest median of `reference_steps` consecutive points among the `lookback_steps`
    points before the recent ones, so a rising trend never drags it up; levels are positive
    values (log scale), non-positive ones are left out.
    """
    table: dict[int, list[dict[str, Any]]] = {}
    r, k, look = p.recent_steps, p.reference_steps, p.lookback_steps
    for sig in p.growth:
        for steps, values in subseries(history, kinds, sig.key):
            positive = values > 0
            steps, values = steps[positive], values[positive]
            judged_at, ends = _evaluated(steps, at)
            ok = ends >= r + max(k, p.min_points)
            judged_at, ends = judged_at[ok], ends[ok]
            if not len(ends):
                continue
            logs = np.log(values)
            rolling = row_nanmedian(_take(logs, np.arange(k, len(logs) + 1), k))  # rolling[j]: points j..j+k-1
            level = row_nanmedian(_take(logs, ends, r))
            for step, end, lvl in zip(judged_at.tolist(), ends.tolist(), level.tolist(), strict=True):
                first = max(0, end - r - look)
                last = end - r - k  # the last window that ends before the recent points
                ref = float(np.min(rolling[first : last + 1]))
                value, reference = math.exp(lvl), math.exp(ref)
                table.setdefault(step, []).append(
                    {
                        "key": sig.key,
                        "value": json_number(value),
                        "baseline": json_number(reference),
                        "ratio": json_number(value / reference),
                        "change": json_number(value - reference),
                        "min_abs": sig.min_abs,
                    }
                )
    return table


def _idle_clip(history: History, p: MismatchParams, step: int) -> list[str]:
    """The clip-fraction keys logged at `step` when every one of them was exactly 0 at each of its last
    `recent_steps` points (the clip idle), else none."""
    idle = []
    for key in p.clip_keys:
        found = history.upto(key, step)
        if found is None:
            continue
        if len(found[1]) < p.recent_steps or np.any(found[1][-p.recent_steps :]):
            return []
        idle.append(key)
    return idle


def _worst_per_key(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One band hit per key: its most severe (a value past the critical band is past the warning one too)."""
    worst: dict[str, dict[str, Any]] = {}
    for h in hits:
        if h["key"] not in worst or h["severity"] == "critical":
            worst[h["key"]] = h
    return list(worst.values())


def _mismatch(
    history: History,
    p: MismatchParams,
    bands: dict[int, list[dict[str, Any]]],
    growth: dict[int, list[dict[str, Any]]],
    step: int,
) -> Flag | None:
    """The `mismatch` flag at `step`: bands first (they need no baseline), else the drift test."""
    band_hits = _worst_per_key(bands.get(step, []))
    idle = _idle_clip(history, p, step) if band_hits or step in growth else []
    needed = p.idle_clip_ratio if idle else p.ratio
    grown = [
        g for g in growth.get(step, []) if float(g["ratio"]) >= needed and float(g["change"]) >= float(g["min_abs"])
    ]
    if not band_hits and not grown:
        return None
    critical = any(h["severity"] == "critical" for h in band_hits) or bool(grown and idle)
    severity = "critical" if critical else "warning"
    parts = [f"{h['key']} = {_text(float(h['value']))} ({h['meaning'] or 'outside its band'})" for h in band_hits] + [
        f"{g['key']} {float(g['ratio']):.1f}x its earlier level {_text(float(g['baseline']))} (now {_text(float(g['value']))})"
        for g in grown
    ]
    if idle and grown:
        parts.append(f"{', '.join(idle)} exactly 0 while it grows: the policy ratio does not see the gap")
    return Flag(
        step=step,
        kind="mismatch",
        severity=severity,
        detector=KIND_DETECTORS["mismatch"][0 if band_hits else 1],
        message="mismatch: sampler and trainer disagree on the sampled tokens: " + "; ".join(parts),
        evidence={
            "bands": band_hits,
            "growth": growth.get(step, []),
            "threshold": {"ratio": needed, "recent_steps": p.recent_steps, "lookback_steps": p.lookback_steps},
            "idle_clip": idle,
        },
    )


def _non_finite_table(history: History, kinds: StepKinds, steps: np.ndarray) -> dict[int, dict[str, float | str]]:
    """step -> {key: value} of the keys that turn non-finite at that step (finite, or absent, at their previous
    non-empty step: a value that went non-finite at an empty step, where nothing is flagged, is flagged at the
    next step that has tokens)."""
    table: dict[int, dict[str, float | str]] = {}
    for key in history.keys():  # noqa: SIM118 - a History, not a dict: it has keys() but no __iter__
        key_steps, values = history.series(key) or (np.empty(0, dtype=np.int64), np.empty(0))
        keep = ~kinds.empty(key_steps)
        key_steps, values = key_steps[keep], values[keep]
        bad = ~np.isfinite(values)
        if not bad.any():
            continue
        judged_at, ends = _evaluated(key_steps, steps)
        for step, end in zip(judged_at.tolist(), ends.tolist(), strict=True):
            if bad[end - 1] and not (end >= 2 and bad[end - 2]):
                table.setdefault(step, {})[key] = json_number(float(values[end - 1]))
    return table


def _non_finite(table: dict[int, dict[str, float | str]], step: int) -> Flag | None:
    newly = table.get(step)
    if not newly:
        return None
    listed = ", ".join(f"{k} = {v}" for k, v in sorted(newly.items()))
    return Flag(
        step=step,
        kind="non_finite",
        severity="critical",
        detector=KIND_DETECTORS["non_finite"][0],
        message=f"non_finite: {listed}",
        evidence={"values": dict(sorted(newly.items()))},
    )


def _on_policy(history: History, step: int, keys: tuple[str, ...], min_steps: int) -> Flag | None:
    first = history.upto(keys[0], step)
    if first is None:
        return None
    steps = first[0]

    def exact(at: int) -> bool:
        return all(history.value(k, at) == 0.0 for k in keys)

    if len(steps) < min_steps or not all(exact(int(s)) for s in steps[::-1][:min_steps]):
        return None
    if len(steps) > min_steps and exact(int(steps[-min_steps - 1])):
        return None
    return Flag(
        step=step,
        kind="on_policy",
        severity="info",
        detector=KIND_DETECTORS["on_policy"][0],
        message=(
            f"on_policy: {' and '.join(keys)} exactly 0 for {min_steps} steps: every importance ratio is 1 "
            "(one update per rollout), so the ratio and hazard diagnostics carry no information"
        ),
        evidence={"keys": list(keys), "since_step": int(steps[-min_steps]), "threshold": {"min_steps": min_steps}},
    )


@dataclass(frozen=True)
class Scope:
    """What every detector judges from: the history, the kind of each step, the evaluated steps."""

    history: History
    kinds: StepKinds
    at: np.ndarray
    loss: str | None = None  # the run's loss (registry name), for bounds that depend on its family


@dataclass(frozen=True)
class Detector:
    """A detector: `prepare` computes its statistics for every evaluated step at once (vectorised),
    `judge` turns them into the flag of one step, or None.

    `instances` gives the flag kinds it raises with their parameters; `active` says whether
    a kind's parameters switch it on; `hold` is the refractory period of its flags in steps
    (None: every flag stands alone).
    """

    name: str
    instances: Callable[[FlagParams], Mapping[str, Any]]
    prepare: Callable[[Scope, str, Any], Any]
    judge: Callable[[Scope, str, Any, Any, int], Flag | None]
    active: Callable[[Any], bool]
    hold: Callable[[Any], int] | None


DETECTORS: dict[str, Detector] = {}


def register_detector(
    name: str,
    *,
    instances: Callable[[FlagParams], Mapping[str, Any]],
    judge: Callable[[Scope, str, Any, Any, int], Flag | None],
    active: Callable[[Any], bool] = lambda p: bool(p.enabled),
    hold: Callable[[Any], int] | None = None,
) -> Callable[[Callable[[Scope, str, Any], Any]], Callable[[Scope, str, Any], Any]]:
    """Decorator registering a detector's `prepare` under `name`; a second registration is refused.

    `detect` runs the detectors in registration order, so a step's flags come in that order.
    """

    def decorate(prepare: Callable[[Scope, str, Any], Any]) -> Callable[[Scope, str, Any], Any]:
        if name in DETECTORS:
            raise ValueError(f"detector {name!r} is already registered; pick another name")
        DETECTORS[name] = Detector(name, instances, prepare, judge, active, hold)
        return prepare

    return decorate


@register_detector(
    "drift",
    instances=lambda fp: fp.drifts(),
    judge=lambda _s, kind, p, tables, step: _drift(kind, p, tables[0], tables[1], step),
    hold=lambda p: p.refractory_steps,
)
def _prepare_drift(s: Scope, _kind: str, p: DriftParams) -> tuple[list[dict[int, _Judged]], list[dict[int, _Judged]]]:
    return (
        _drift_tables(s.history, s.kinds, p.signals, p, s.at, False),
        _drift_tables(s.history, s.kinds, p.unless, p, s.at, True),
    )


@register_detector(
    "bound",
    instances=lambda fp: {"trust_region": fp.trust_region},
    judge=lambda _s, _kind, _p, table, step: _trust_region(table, step),
    hold=lambda p: p.refractory_steps,
)
def _prepare_bound(s: Scope, _kind: str, p: TrustRegionParams) -> dict[int, list[dict[str, Any]]]:
    return _bound_table(s.history, p.bounds_for(s.loss), s.at)


@register_detector(
    "mismatch",
    instances=lambda fp: {"mismatch": fp.mismatch},
    judge=lambda s, _kind, p, tables, step: _mismatch(s.history, p, tables[0], tables[1], step),
    hold=lambda p: p.refractory_steps,
)
def _prepare_mismatch(
    s: Scope, _kind: str, p: MismatchParams
) -> tuple[dict[int, list[dict[str, Any]]], dict[int, list[dict[str, Any]]]]:
    return _band_hits(s.history, p, s.at), _growth_table(s.history, s.kinds, p, s.at)


@register_detector(
    "robust_z",
    instances=lambda fp: fp.spikes(),
    judge=lambda _s, kind, p, tables, step: _spike(kind, p, tables, step),
)
def _prepare_spike(s: Scope, _kind: str, p: SpikeParams) -> list[dict[int, dict[str, Any]]]:
    return [_spike_table(s.history, s.kinds, key, p, s.at) for key in p.keys]


@register_detector(
    "non_finite_scan",
    instances=lambda fp: {"non_finite": fp.non_finite},
    judge=lambda _s, _kind, _p, table, step: _non_finite(table, step),
)
def _prepare_non_finite(s: Scope, _kind: str, _p: NonFiniteParams) -> dict[int, dict[str, float | str]]:
    return _non_finite_table(s.history, s.kinds, s.at)


@register_detector(
    "exact_ratio",
    instances=lambda fp: {"on_policy": fp.on_policy},
    judge=lambda s, _kind, p, _table, step: _on_policy(s.history, step, p.keys, p.min_steps),
    active=lambda p: bool(p.enabled and p.keys),
)
def _prepare_on_policy(_s: Scope, _kind: str, _p: OnPolicyParams) -> None:
    return None


def refractory_kinds(params: FlagParams) -> tuple[str, ...]:
    """The kinds `detect` holds for a refractory period: the caller loads their last flagged steps
    (`last_flagged`), so the period holds across batches and server restarts, not only within one call."""
    return tuple(kind for d in DETECTORS.values() if d.hold is not None for kind in d.instances(params))


def detect(
    history: History,
    steps: Iterable[int],
    params: FlagParams = DEFAULT_PARAMS,
    last_flagged: MutableMapping[str, int] | None = None,
    loss: str | None = None,
) -> list[Flag]:
    """Flags at each of `steps` (ascending), judged on `history` up to that step, by every registered detector.

    `last_flagged` maps `refractory_key(kind, severity)` -> the latest step already flagged
    with that kind at that severity or above (from the store); it is updated in place and
    enforces the refractory period of the detectors that have one. The window statistics
    are computed for all steps at once (vectorised); the result is the same as evaluating
    step by step. Empty steps (`tokens/valid` = 0) are never flagged. `loss`: the run's loss, where
    known (the run's `loss` field), for the trust-region bounds of its family.
    """
    last = last_flagged if last_flagged is not None else {}
    kinds = StepKinds(history)
    at = np.array(sorted(set(steps)), dtype=np.int64)
    scope = Scope(history, kinds, at[~kinds.empty(at)], loss)
    prepared = [
        (d, kind, p, d.prepare(scope, kind, p))
        for d in DETECTORS.values()
        for kind, p in d.instances(params).items()
        if d.active(p)
    ]
    flags: list[Flag] = []
    for step in scope.at.tolist():
        found = []
        for d, kind, p, table in prepared:
            flag = d.judge(scope, kind, p, table, step)
            if flag is not None and (
                d.hold is None or _outside_refractory(last, flag.kind, flag.severity, d.hold(p), step)
            ):
                found.append(flag)
        for flag in found:
            flags.append(flag)
            _held(last, flag.kind, flag.severity, step)
    return flags


SEVERITIES = ("info", "warning", "critical")


def _outside_refractory(last: Mapping[str, int], kind: str, severity: str, hold: int, step: int) -> bool:
    """Whether a flag of `kind` at `step` is a new event: `hold` steps after the last flag of its kind
    of at least its severity (so a critical after a warning still comes: an escalation); an
    informational flag also `hold` // 8 steps after any flag of its kind."""
    never = -(10**12)
    if severity == "info":
        return step - last.get(refractory_key(kind, "warning"), never) > hold and (
            step - last.get(refractory_key(kind, "info"), never) > hold // 8
        )
    return step - last.get(refractory_key(kind, severity), never) > hold


def refractory_key(kind: str, severity: str) -> str:
    """The `last_flagged` entry of the latest flag of `kind` of at least `severity`."""
    return f"{kind}:{severity}"


def refractory_state(latest: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """`detect`'s `last_flagged` from the latest flagged step per (kind, severity) of the stored flags."""
    state: dict[str, int] = {}
    for (kind, severity), step in latest.items():
        _held(state, kind, severity, step)
    return state


def _held(last: MutableMapping[str, int], kind: str, severity: str, step: int) -> None:
    """Record a flag of `kind` at `step`: the latest flag of its severity and of every lower one."""
    for level in SEVERITIES[: SEVERITIES.index(severity) + 1]:
        key = refractory_key(kind, level)
        last[key] = max(step, last.get(key, step))
