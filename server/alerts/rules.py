"""Rule evaluation: pure functions from a run's history and new flags to the rules that fire.

A scalar rule (threshold, spike) is edge-triggered: it fires at a step where its
condition holds and did not hold at the previous logged point, so a metric that stays
above a threshold fires once, not at every step. A flag rule fires on each matching flag.
The caller applies the cooldown (per rule and run, in wall-clock seconds).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.alerts.schemas import SEVERITY_RANK, AlertRule, FlagCondition, SpikeCondition, ThresholdCondition
from server.flags.detectors import MAD_TO_SIGMA, Flag, History, fast_median, json_number

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class Firing:
    """One rule matching at one step, before the cooldown is applied."""

    rule: AlertRule
    step: int
    message: str
    evidence: dict[str, Any]


def history_points(rule: AlertRule) -> int:
    """How many logged points before a new step the rule needs."""
    cond = rule.condition
    if isinstance(cond, ThresholdCondition):
        return cond.for_steps + 1
    if isinstance(cond, SpikeCondition):
        return cond.window_steps + 2
    return 0


def _threshold_at(values: np.ndarray, end: int, cond: ThresholdCondition) -> bool:
    if end < cond.for_steps:
        return False
    test = OPS[cond.op]
    return all(test(float(v), cond.value) for v in values[end - cond.for_steps : end])


def _spike_at(values: np.ndarray, end: int, cond: SpikeCondition) -> tuple[bool, dict[str, Any]]:
    if end < 1 or not math.isfinite(values[end - 1]):
        return False, {}
    window = values[max(0, end - 1 - cond.window_steps) : end - 1]
    window = window[np.isfinite(window)]
    if len(window) < cond.min_baseline:
        return False, {}
    centre = fast_median(window)
    scale = max(MAD_TO_SIGMA * fast_median(np.abs(window - centre)), 1e-9 + 1e-4 * abs(centre))
    z = (float(values[end - 1]) - centre) / scale
    fired = {"up": z > cond.z, "down": z < -cond.z, "both": abs(z) > cond.z}[cond.direction]
    evidence = {"value": float(values[end - 1]), "baseline": centre, "scale": scale, "z": z}
    return fired, {name: json_number(x) for name, x in evidence.items()}


def _scalar_firings(rule: AlertRule, history: History, steps: Sequence[int]) -> list[Firing]:
    cond = rule.condition
    assert isinstance(cond, ThresholdCondition | SpikeCondition)
    out = []
    for step in steps:
        found = history.upto(cond.key, step)
        if found is None:
            continue
        values = found[1]
        n = len(values)
        if isinstance(cond, ThresholdCondition):
            if not _threshold_at(values, n, cond) or _threshold_at(values, n - 1, cond):
                continue
            evidence = {
                "key": cond.key,
                "value": json_number(float(values[-1])),
                "threshold": {"op": cond.op, "value": cond.value, "for_steps": cond.for_steps},
            }
            what = f"{cond.key} = {float(values[-1]):.4g} {cond.op} {cond.value:g}"
            if cond.for_steps > 1:
                what += f" for {cond.for_steps} steps"
        else:
            fired, evidence = _spike_at(values, n, cond)
            if not fired or _spike_at(values, n - 1, cond)[0]:
                continue
            evidence.update(
                key=cond.key, threshold={"z": cond.z, "direction": cond.direction, "window_steps": cond.window_steps}
            )
            what = (
                f"{cond.key} = {float(values[-1]):.4g} spiked "
                f"(robust z = {float(evidence['z']):.1f} vs baseline {float(evidence['baseline']):.4g})"
            )
        out.append(Firing(rule=rule, step=step, message=f"{rule.name}: {what} at step {step}", evidence=evidence))
    return out


def _flag_firings(rule: AlertRule, flags: Iterable[Flag]) -> list[Firing]:
    cond = rule.condition
    assert isinstance(cond, FlagCondition)
    return [
        Firing(
            rule=rule,
            step=flag.step,
            message=f"{rule.name}: {flag.message} at step {flag.step}",
            evidence={"flag": flag.as_event()},
        )
        for flag in flags
        if cond.kind in ("*", flag.kind) and SEVERITY_RANK[flag.severity] >= SEVERITY_RANK[cond.min_severity]
    ]


def evaluate(rules: Iterable[AlertRule], history: History, steps: Sequence[int], flags: Sequence[Flag]) -> list[Firing]:
    """Every (rule, step) match among the new `steps` and new `flags`, ordered by step."""
    steps = sorted(set(steps))
    out: list[Firing] = []
    for rule in rules:
        if isinstance(rule.condition, FlagCondition):
            out.extend(_flag_firings(rule, flags))
        else:
            out.extend(_scalar_firings(rule, history, steps))
    return sorted(out, key=lambda f: (f.step, f.rule.id))
