"""Flag detectors: pure, deterministic functions of a run's recent scalar history.

`detect(history, steps, params)` evaluates every detector at each step of `steps` using
only the points logged at or before that step, so the flags of a run do not depend on
how its records were batched. Windows count logged points (not step numbers), so a run
that logs every 10th step gets the same behaviour as one that logs every step.

Detectors (kind: detector name):
- `collapse`, `erosion`: `level_shift`, a vote among signals (DESIGN 2.1) whose recent
  median left its rolling baseline (median/MAD) by a relative, absolute and robust-z
  margin; one flag per event (refractory period).
- `hazard_spike`, `grad_spike`: `robust_z`, a one-step robust z-score (log scale) vs the
  rolling median/MAD of the previous points; fires at the onset of an excursion.
- `non_finite`: `non_finite_scan`, a scalar that turns NaN or +-Infinity.
- `on_policy`: `exact_ratio`, the log-ratio is exactly 0 for several steps in a row
  (informational: one update per rollout, ratio diagnostics carry no information).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.flags.params import DEFAULT_PARAMS, FlagParams, ShiftParams, ShiftSignal, SpikeParams

KINDS = ("collapse", "erosion", "hazard_spike", "grad_spike", "non_finite", "on_policy")
DETECTORS = {
    "collapse": "level_shift",
    "erosion": "level_shift",
    "hazard_spike": "robust_z",
    "grad_spike": "robust_z",
    "non_finite": "non_finite_scan",
    "on_policy": "exact_ratio",
}
MAD_TO_SIGMA = 1.4826


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


def fast_median(values: np.ndarray) -> float:
    """Median of a small 1-d array (np.median's overhead dominates at window sizes)."""
    ordered = np.sort(values)
    n = len(ordered)
    mid = n // 2
    return float(ordered[mid]) if n % 2 else 0.5 * float(ordered[mid - 1] + ordered[mid])


def json_number(x: float) -> float | str:
    """A JSON-safe number: non-finite values become the strings "NaN", "Infinity", "-Infinity"."""
    if math.isfinite(x):
        return round(x, 9)
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


@dataclass(frozen=True)
class _Windows:
    """Rolling statistics of one key at the evaluated steps (NaN where there is too little history)."""

    level: np.ndarray  # median of the recent window (level shift) or the point itself (spike)
    baseline: np.ndarray  # median of the baseline window
    scale: np.ndarray  # 1.4826 * MAD of the baseline window, floored


def _row_nanmedian(rows: np.ndarray) -> np.ndarray:
    """Median of the non-NaN entries of each row (NaN for an all-NaN row); np.nanmedian is slow on small rows."""
    ordered = np.sort(rows, axis=1)  # NaN sorts last
    count = np.sum(~np.isnan(rows), axis=1)
    index = np.arange(len(rows))
    lo, hi = np.maximum((count - 1) // 2, 0), np.maximum(count // 2, 0)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, 0.5 * (ordered[index, lo] + ordered[index, hi]), np.nan)


def _windows(values: np.ndarray, ends: np.ndarray, recent: int, baseline: int, min_baseline: int) -> _Windows:
    """Vectorised over `ends` (exclusive end indices): the last `recent` points and the `baseline` before them.

    Non-finite points are ignored (NaN-aware medians); a window with fewer than
    `min_baseline` finite baseline points, or fewer than half its recent points, yields NaN.
    """
    pad = recent + baseline
    padded = np.concatenate([np.full(pad, np.nan), np.where(np.isfinite(values), values, np.nan)])
    e = ends + pad
    rec = padded[e[:, None] - recent + np.arange(recent)]
    base = padded[e[:, None] - recent - baseline + np.arange(baseline)]
    level = _row_nanmedian(rec) if recent > 1 else rec[:, 0]
    centre = _row_nanmedian(base)
    scale = MAD_TO_SIGMA * _row_nanmedian(np.abs(base - centre[:, None]))
    enough = (np.sum(~np.isnan(base), axis=1) >= min_baseline) & (np.sum(~np.isnan(rec), axis=1) >= (recent + 1) // 2)
    scale = np.maximum(scale, 1e-9 + 1e-4 * np.abs(centre))
    nan = np.full(len(ends), np.nan)
    return _Windows(
        level=np.where(enough, level, nan),
        baseline=np.where(enough, centre, nan),
        scale=np.where(enough, scale, nan),
    )


def _positions(history: History, key: str, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(values of `key`, exclusive end index per step or -1 where `key` is not logged at that step)."""
    found = history.series(key)
    if found is None:
        return None
    key_steps, values = found
    idx = np.searchsorted(key_steps, steps, side="right")
    present = (idx > 0) & (key_steps[np.maximum(idx - 1, 0)] == steps)
    return values, np.where(present, idx, -1)


def _shift_table(history: History, sig: ShiftSignal, p: ShiftParams, steps: np.ndarray) -> dict[int, tuple[float, ...]]:
    """step -> (level, baseline, scale, change, rel, z, vote) for the steps where `sig` can be judged."""
    found = _positions(history, sig.key, steps)
    if found is None:
        return {}
    values, ends = found
    ok = ends > 0
    if not ok.any():
        return {}
    w = _windows(values, ends[ok], p.recent_steps, p.baseline_steps, p.min_baseline)
    change = w.level - w.baseline if sig.direction == "up" else w.baseline - w.level
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(w.baseline != 0, change / np.abs(w.baseline), np.inf)
    z = change / w.scale
    vote = (change >= sig.min_abs) & (rel >= sig.min_rel) & (z >= sig.z) & (change > 0)
    table = {}
    for i, step in enumerate(steps[ok].tolist()):
        if not math.isnan(w.baseline[i]):
            table[step] = (w.level[i], w.baseline[i], w.scale[i], change[i], rel[i], z[i], bool(vote[i]))
    return table


def _shift_evidence(sig: ShiftSignal, row: tuple[float, ...]) -> dict[str, Any]:
    level, baseline, scale, _, rel, z, vote = row
    return {
        "key": sig.key,
        "direction": sig.direction,
        "value": json_number(level),
        "baseline": json_number(baseline),
        "scale": json_number(scale),
        "change_rel": json_number(rel),
        "z": json_number(z),
        "threshold": {"min_rel": sig.min_rel, "min_abs": sig.min_abs, "z": sig.z},
        "vote": vote,
    }


def _level_shift(kind: str, p: ShiftParams, tables: list[dict[int, tuple[float, ...]]], step: int) -> Flag | None:
    judged = [(sig, table[step]) for sig, table in zip(p.signals, tables, strict=True) if step in table]
    if not judged:
        return None
    votes = [(sig, row) for sig, row in judged if row[-1]]
    needed = min(p.min_votes, len(judged))
    if len(votes) < needed:
        return None
    severity = "critical" if len(votes) >= p.critical_votes else "warning"
    parts = ", ".join(
        f"{sig.key} {'+' if sig.direction == 'up' else '-'}{100 * float(row[4]):.0f}%" for sig, row in votes
    )
    return Flag(
        step=step,
        kind=kind,
        severity=severity,
        detector=DETECTORS[kind],
        message=f"{kind}: {parts} vs the rolling baseline ({len(votes)} of {len(judged)} signals)",
        evidence={
            "signals": [_shift_evidence(sig, row) for sig, row in judged],
            "votes": len(votes),
            "needed": needed,
            "window": {"baseline_steps": p.baseline_steps, "recent_steps": p.recent_steps},
        },
    )


def _spike_table(history: History, key: str, p: SpikeParams, steps: np.ndarray) -> dict[int, dict[str, Any]]:
    """step -> evidence for the steps where `key` starts an excursion (fires now, not at its previous point)."""
    found = _positions(history, key, steps)
    if found is None:
        return {}
    values, ends = found
    ok = ends > 0
    if not ok.any():
        return {}
    f = values.copy()
    if p.log_scale:
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(values > 0, np.log(np.where(values > 0, values, 1.0)), np.nan)
    ends = ends[ok]
    both = np.concatenate([ends, ends - 1])
    w = _windows(f, both, 1, p.window_steps, p.min_baseline)
    if p.log_scale:
        scale = np.maximum(w.scale, 1e-6)
        baseline, value = np.exp(w.baseline), np.exp(w.level)
    else:
        scale, baseline, value = w.scale, w.baseline, w.level
    z = (w.level - w.baseline) / scale
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(baseline > 0, value / baseline, np.inf)
    fired = (z > p.z) & (ratio >= p.min_ratio) & (both > 0)
    m = len(ends)
    onset = fired[:m] & ~fired[m:]
    table = {}
    for i in np.flatnonzero(onset).tolist():
        table[int(steps[ok][i])] = {
            "key": key,
            "value": json_number(float(value[i])),
            "baseline": json_number(float(baseline[i])),
            "ratio": json_number(float(ratio[i])),
            "z": json_number(float(z[i])),
            "threshold": {"z": p.z, "min_ratio": p.min_ratio, "log_scale": p.log_scale},
        }
    return table


def _spike(kind: str, p: SpikeParams, tables: list[dict[int, dict[str, Any]]], step: int) -> Flag | None:
    hits = [table[step] for table in tables if step in table]
    if not hits:
        return None
    severity = "critical" if any(float(h["z"]) >= p.critical_z for h in hits) else "warning"
    parts = ", ".join(
        f"{h['key']} = {float(h['value']):.4g} ({float(h['ratio']):.1f}x baseline, z={float(h['z']):.1f})" for h in hits
    )
    return Flag(
        step=step,
        kind=kind,
        severity=severity,
        detector=DETECTORS[kind],
        message=f"{kind}: {parts}",
        evidence={"signals": hits, "window_steps": p.window_steps},
    )


def _non_finite_table(history: History, steps: np.ndarray) -> dict[int, dict[str, float | str]]:
    """step -> {key: value} of the keys that turn non-finite at that step (finite, or absent, just before)."""
    table: dict[int, dict[str, float | str]] = {}
    for key in history.keys():
        values, ends = _positions(history, key, steps) or (np.empty(0), np.empty(0, dtype=np.int64))
        bad = ~np.isfinite(values)
        if not bad.any():
            continue
        for step, end in zip(steps.tolist(), ends.tolist(), strict=True):
            if end > 0 and bad[end - 1] and not (end >= 2 and bad[end - 2]):
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
        detector=DETECTORS["non_finite"],
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
        detector=DETECTORS["on_policy"],
        message=(
            f"on_policy: {' and '.join(keys)} exactly 0 for {min_steps} steps: every importance ratio is 1 "
            "(one update per rollout), so the ratio and hazard diagnostics carry no information"
        ),
        evidence={"keys": list(keys), "since_step": int(steps[-min_steps]), "threshold": {"min_steps": min_steps}},
    )


def detect(
    history: History,
    steps: Iterable[int],
    params: FlagParams = DEFAULT_PARAMS,
    last_flagged: MutableMapping[str, int] | None = None,
) -> list[Flag]:
    """Flags at each of `steps` (ascending), judged on `history` up to that step.

    `last_flagged` maps kind -> latest step already flagged (from the store); it is
    updated in place and enforces the level-shift detectors' refractory period. The
    window statistics are computed for all steps at once (vectorised); the result is the
    same as evaluating step by step.
    """
    last = last_flagged if last_flagged is not None else {}
    at = np.array(sorted(set(steps)), dtype=np.int64)
    shift = {
        kind: [_shift_table(history, sig, getattr(params, kind), at) for sig in getattr(params, kind).signals]
        for kind in ("collapse", "erosion")
        if getattr(params, kind).enabled
    }
    spikes = {
        kind: [_spike_table(history, key, getattr(params, kind), at) for key in getattr(params, kind).keys]
        for kind in ("hazard_spike", "grad_spike")
        if getattr(params, kind).enabled
    }
    non_finite = _non_finite_table(history, at) if params.non_finite.enabled else {}
    on_policy = params.on_policy if params.on_policy.enabled and params.on_policy.keys else None
    flags: list[Flag] = []
    for step in at.tolist():
        found: list[Flag | None] = []
        for kind, tables in shift.items():
            p: ShiftParams = getattr(params, kind)
            if step - last.get(kind, -(10**12)) > p.refractory_steps:
                found.append(_level_shift(kind, p, tables, step))
        for kind, spike_tables in spikes.items():
            found.append(_spike(kind, getattr(params, kind), spike_tables, step))
        found.append(_non_finite(non_finite, step))
        if on_policy is not None:
            found.append(_on_policy(history, step, on_policy.keys, on_policy.min_steps))
        for flag in found:
            if flag is not None:
                flags.append(flag)
                last[flag.kind] = max(step, last.get(flag.kind, step))
    return flags
