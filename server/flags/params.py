"""Detector parameters: documented defaults that a project can override.

A project overrides any subset through `PUT /api/v1/projects/{project}/flag-params`
(stored in the `flag_params` table); `FlagParams.merged(overrides)` applies a partial
dict over the defaults, so a project that only raises one threshold keeps every other
default. Unknown names are rejected, so a typo never silently does nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShiftSignal(_Strict):
    """One vote of a level-shift detector: the recent median of `key` moved from its baseline.

    It votes when the move, in the direction given, is at least `min_rel` of |baseline|,
    at least `min_abs` in absolute terms, and at least `z` robust standard deviations
    (1.4826 * MAD of the baseline window).
    """

    key: str
    direction: Literal["up", "down"]
    min_rel: float = Field(0.0, ge=0.0)
    min_abs: float = Field(0.0, ge=0.0)
    z: float = Field(4.0, gt=0.0)


class ShiftParams(_Strict):
    """A level-shift detector (collapse, erosion): a vote among several signals.

    At step s the baseline is the window of steps [s - baseline_steps - recent_steps,
    s - recent_steps) and the recent level is the median of the last `recent_steps`
    steps up to s. The flag fires when at least `min_votes` signals vote (or all of them
    when fewer than `min_votes` are present in the run), then stays quiet for
    `refractory_steps` so one event gives one flag.
    """

    enabled: bool = True
    signals: tuple[ShiftSignal, ...]
    baseline_steps: int = Field(60, ge=5)
    recent_steps: int = Field(5, ge=1)
    min_baseline: int = Field(20, ge=3, description="warm-up: baseline points needed before voting")
    min_votes: int = Field(2, ge=1)
    critical_votes: int = Field(3, ge=1)
    refractory_steps: int = Field(60, ge=0)


class SpikeParams(_Strict):
    """A one-step spike detector (hazard_spike, grad_spike): robust z-score vs a rolling baseline.

    z = (f(v) - median(f(window))) / (1.4826 * MAD(f(window))) over the previous
    `window_steps` steps, f = log when `log_scale` (for positive, multiplicative metrics).
    It fires at the onset of an excursion (z > `z` at s but not at the previous step)
    when also v >= `min_ratio` * baseline, so a flat, near-zero-MAD series never flags
    on a tiny wiggle. `critical_z` marks the severity.
    """

    enabled: bool = True
    keys: tuple[str, ...]
    window_steps: int = Field(100, ge=5)
    min_baseline: int = Field(30, ge=3)
    z: float = Field(8.0, gt=0.0)
    critical_z: float = Field(16.0, gt=0.0)
    min_ratio: float = Field(1.5, ge=1.0)
    log_scale: bool = True


class NonFiniteParams(_Strict):
    """`non_finite`: a scalar turns NaN or +-Infinity (fires when a key becomes non-finite)."""

    enabled: bool = True


class OnPolicyParams(_Strict):
    """`on_policy` (informational): every log-ratio exactly 0 for `min_steps` steps in a row."""

    enabled: bool = True
    min_steps: int = Field(5, ge=1)
    keys: tuple[str, ...] = ("ratio/min", "ratio/max")


def _collapse() -> ShiftParams:
    return ShiftParams(
        signals=(
            ShiftSignal(key="policy/entropy", direction="down", min_rel=0.2, z=4.0),
            ShiftSignal(key="ratio/frac_above_0.2", direction="up", min_rel=1.0, min_abs=0.01, z=4.0),
            ShiftSignal(key="group/distinct_frac", direction="down", min_rel=0.15, z=4.0),
        )
    )


def _erosion() -> ShiftParams:
    return ShiftParams(
        signals=(
            ShiftSignal(key="ratio/frac_below_0.2", direction="up", min_rel=1.0, min_abs=0.01, z=4.0),
            ShiftSignal(key="ratio/clip_frac_low", direction="up", min_rel=1.0, min_abs=0.01, z=4.0),
            ShiftSignal(key="policy/logp_mean", direction="down", min_rel=0.3, z=4.0),
            ShiftSignal(key="policy/length_mean", direction="down", min_rel=0.25, z=4.0),
        )
    )


class FlagParams(_Strict):
    """Every detector's parameters; the defaults are tuned on `server.flags.synthetic` streams."""

    collapse: ShiftParams = Field(default_factory=_collapse)
    erosion: ShiftParams = Field(default_factory=_erosion)
    hazard_spike: SpikeParams = SpikeParams(keys=("hazard/zeta_mean", "hazard/zeta_p99"))
    grad_spike: SpikeParams = SpikeParams(keys=("grad/norm",), z=6.0, min_ratio=3.0)
    non_finite: NonFiniteParams = NonFiniteParams()
    on_policy: OnPolicyParams = OnPolicyParams()

    def merged(self, overrides: dict[str, Any] | None) -> FlagParams:
        """These parameters with a partial, nested `overrides` dict applied (validated)."""
        if not overrides:
            return self
        return FlagParams.model_validate(_deep_merge(self.model_dump(), overrides))

    def history_steps(self) -> int:
        """How many steps of history the detectors read before the first new step."""
        shift = max(p.baseline_steps + p.recent_steps for p in (self.collapse, self.erosion))
        spike = max(p.window_steps for p in (self.hazard_spike, self.grad_spike))
        return max(shift, spike + 1, self.on_policy.min_steps) + 1

    def keys(self) -> set[str]:
        """The scalar keys any detector reads."""
        found = {s.key for p in (self.collapse, self.erosion) for s in p.signals}
        found.update(self.hazard_spike.keys, self.grad_spike.keys, self.on_policy.keys)
        return found


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = _deep_merge(out[name], value)
        else:
            out[name] = value
    return out


DEFAULT_PARAMS = FlagParams()
