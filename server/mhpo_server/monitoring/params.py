"""Detector parameters: documented defaults that a project can override, each with bounds.

A project overrides any subset through `PUT /api/v1/projects/{project}/flag-params`
(stored in the `flag_params` table); `FlagParams.merged(overrides)` applies a partial
dict over the defaults, so a project that only raises one threshold keeps every other
default. Unknown names and values outside a field's bounds are rejected (422 naming the
field), so a typo never silently does nothing and no window can be sized to exhaust memory.

Every signal carries its minimum meaningful change in its own units (`min_abs`, and
`min_rel` of its reference level): a move smaller than that never votes, however flat
the reference was, so a near-constant baseline cannot produce an enormous z.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Key = Annotated[str, Field(min_length=1, max_length=200)]
Steps = Annotated[int, Field(ge=1, le=5_000)]
Z = Annotated[float, Field(gt=0.0, le=1_000.0)]
Units = Annotated[float, Field(ge=0.0, le=1e9)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Signal(_Strict):
    """One vote of a drift detector: `key` moved in `direction` by a meaningful amount.

    It votes when the move is at least `min_abs` (in the key's units) and at least
    `min_rel` of |reference|, and at least `z` noise standard deviations of the test's
    statistic (the noise measured on the key's step-to-step differences, which a trend
    does not inflate).
    """

    key: Key
    direction: Literal["up", "down"]
    min_abs: Units = 0.0
    min_rel: Annotated[float, Field(ge=0.0, le=1_000.0)] = 0.0
    z: Z = 5.0
    family: Annotated[
        str | None, Field(max_length=64, description="signals of one family are one vote for severity")
    ] = None


class DriftParams(_Strict):
    """A drift detector (collapse, erosion, entropy_surge, the drift half of kl_spike).

    Two tests per signal, on the points of the signal's own kind of step (see
    `mhpo_server.monitoring.detectors`): the *level* test compares the median of the last
    `recent_steps` points with the median of the `baseline_steps` points before them;
    the *trend* test takes the Theil-Sen slope over the last `trend_steps` points (a
    steady linear or geometric decline that a sliding baseline would follow). A signal
    votes when either test passes its thresholds. The flag fires when at least
    `min_votes` signals vote and no `unless` signal votes (e.g. reward rising; with
    `vetoed="info"` a vetoed flag is kept as informational instead of dropped), then
    stays quiet for `refractory_steps` steps so one event gives one flag. Its severity
    counts independent votes, signals of one `family` (two views of one quantity, e.g.
    token entropy and group diversity, which a sharpening policy lowers together) counting
    once: `info` below `warning_votes` (one signal alone, e.g. entropy declining steadily,
    which a healthy run that is learning also does), `warning` from `warning_votes`,
    `critical` from `critical_votes` signals voting with at least `warning_votes`
    independent votes. A run that logs fewer independent signals than `warning_votes`
    (e.g. entropy only) gets informational flags from this detector, never an alarm.
    """

    enabled: bool = True
    signals: Annotated[tuple[Signal, ...], Field(max_length=16)]
    unless: Annotated[tuple[Signal, ...], Field(max_length=16)] = ()
    baseline_steps: Annotated[int, Field(ge=5, le=2_000)] = 60
    recent_steps: Annotated[int, Field(ge=1, le=200)] = 5
    trend_steps: Annotated[int, Field(ge=5, le=500)] = 30
    min_baseline: Annotated[int, Field(ge=3, le=2_000, description="warm-up: points needed before judging")] = 20
    min_votes: Annotated[int, Field(ge=1, le=16)] = 1
    warning_votes: Annotated[int, Field(ge=1, le=16)] = 2
    critical_votes: Annotated[int, Field(ge=1, le=16)] = 3
    refractory_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 200
    vetoed: Literal["silent", "info"] = "silent"


class SpikeParams(_Strict):
    """A one-step spike detector (hazard_spike, grad_spike, kl_spike): robust z vs a rolling baseline.

    z = (f(v) - median(f(window))) / max(1.4826 * MAD(f(window)), `min_scale`) over the
    previous `window_steps` points of the same kind of step, f = log when `log_scale`
    (positive, multiplicative metrics; `min_scale` is then a relative noise floor). It
    fires at the onset of an excursion (z > `z` now but not at the previous point) when
    also v >= `min_ratio` * baseline and v - baseline >= `min_abs` (the key's units).
    `critical_z` marks the severity; a spike of `info_keys` alone is informational (a
    tail statistic that the loss itself absorbs, see `hazard_spike`).
    """

    enabled: bool = True
    keys: Annotated[tuple[Key, ...], Field(max_length=16)]
    window_steps: Annotated[int, Field(ge=5, le=2_000)] = 100
    min_baseline: Annotated[int, Field(ge=3, le=2_000)] = 30
    z: Z = 8.0
    critical_z: Z = 16.0
    min_ratio: Annotated[float, Field(ge=1.0, le=1e6)] = 1.5
    min_abs: Units = 0.0
    min_scale: Annotated[float, Field(ge=0.0, le=1e6)] = 0.05
    log_scale: bool = True
    info_keys: Annotated[tuple[Key, ...], Field(max_length=16)] = ()


class Bound(_Strict):
    """One absolute bound of `trust_region`: `key` above `max` (in the key's units) at any step with tokens."""

    key: Key
    max: Units


def _loss_bounds() -> dict[str, tuple[Bound, ...]]:
    return {"gspo": (Bound(key="grad/update_ratio", max=0.01),)}


class TrustRegionParams(_Strict):
    """`trust_region`: an update that left the loss's trust region, judged on absolute bounds.

    Needs no baseline, so it can fire in the first rollout, where a run driven too hard
    (learning rate, updates per rollout) already breaks down before any rolling window
    exists. It fires at a step where a bound is exceeded, then stays quiet for
    `refractory_steps`; two bounds exceeded at one step make it critical. The defaults
    are the limits of practice: a clip fraction above 0.2 means a fifth of the tokens'
    ratios left GRPO/PPO's [0.8, 1.2] window (PPO implementations treat 0.1-0.2 as the top
    of the healthy range; `ratio/clip_frac` of "mhpo" and "sapo" uses that window too), and
    an update-to-weight norm ratio above 1e-2 is ten times the ~1e-3 that marks a well
    set learning rate (Karpathy, CS231n "Neural Networks Part 3", ratio of weights:updates).
    """

    enabled: bool = True
    bounds: Annotated[tuple[Bound, ...], Field(max_length=16)] = (
        Bound(key="ratio/clip_frac", max=0.2),
        Bound(key="grad/update_ratio", max=0.01),
    )
    # Losses whose bounds differ (the run's `loss`): GSPO clips whole sequences in a window of
    # [1 - 3e-4, 1 + 4e-4] on the sequence log-ratio, so its clip fraction starts at 0.3-0.5 in healthy
    # runs (its paper reports far more clipping than GRPO's); only the update ratio bounds it.
    loss_bounds: Annotated[dict[Key, tuple[Bound, ...]], Field(max_length=16)] = Field(default_factory=_loss_bounds)
    refractory_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 200

    def bounds_for(self, loss: str | None) -> tuple[Bound, ...]:
        """The bounds of a run trained with `loss` (`loss_bounds`, by the lower-cased name; else `bounds`)."""
        return self.loss_bounds.get(loss.lower(), self.bounds) if loss else self.bounds


class Band(_Strict):
    """One absolute band of `mismatch`: `key` (|key| when `absolute`) above `above` or below `below`, in its units."""

    key: Key
    above: Annotated[float, Field(ge=-1e9, le=1e9)] | None = None
    below: Annotated[float, Field(ge=-1e9, le=1e9)] | None = None
    absolute: bool = False
    severity: Literal["warning", "critical"] = "warning"
    meaning: Annotated[str, Field(max_length=200)] = ""


class GrowthSignal(_Strict):
    """One key of the `mismatch` drift test: its recent level against its own earlier low (log scale).

    It votes when the level is at least the detector's ratio times the reference and at least
    `min_abs` (the key's units) above it: a several-fold move of a near-zero level is not one.
    """

    key: Key
    min_abs: Units = 0.0


def _mismatch_bands() -> tuple[Band, ...]:
    return (
        Band(key="mismatch/abs_mean", above=0.05, meaning="suspicious (healthy dense models: ~0.01)"),
        Band(key="mismatch/abs_mean", above=0.2, severity="critical", meaning="broken (e.g. weights not synced)"),
        Band(key="mismatch/is_mean", below=0.5, above=2.0, meaning="IS weights off their [0.5, 2] band"),
        Band(key="mismatch/ess", below=0.3, meaning="effective sample size bad (< 0.3)"),
        Band(key="mismatch/kl_k1", above=0.1, absolute=True, meaning="|KL(sampler || trainer)| > 0.1"),
        Band(key="mismatch/kl_k3", above=0.1, meaning="KL(sampler || trainer) > 0.1"),
        Band(key="mismatch/chi2", above=1.0, meaning="chi-squared of the IS weights > 1"),
    )


class MismatchParams(_Strict):
    """`mismatch`: the sampler and the trainer disagree on the sampled tokens' log-probs.

    Three tests, each on whichever of its keys a run logs (a TRL run maps four, verl about ten):
    - `bands`: absolute bands in each metric's units, from verl's rollout-correction guidance
      (IS mean in [0.5, 2], ESS >= 0.3, |kl| <= 0.1, chi2_token <= 1) and the levels public
      reports give for mean |d| (~0.01 healthy, 0.05 suspicious, 0.2 and above broken). They
      need no baseline, so a run that starts broken (top-k-processed log-probs) is flagged at once.
    - drift (`growth`): the median of a key's last `recent_steps` logged values against its
      reference, the lowest median of `reference_steps` consecutive values among the
      `lookback_steps` values before them (the run's own early level, which a rising trend
      does not drag up), on a log scale: a `ratio`-fold growth at least `min_abs` in size.
    - idle clip: when every clip fraction among `clip_keys` was exactly 0 over the last
      `recent_steps` points, the PPO/MHPO ratio cannot see the gap, so the drift needs only
      `idle_clip_ratio` and a flag is raised one severity up.
    One flag per event: quiet for `refractory_steps` after a flag of its severity (a critical
    after a warning still comes).
    """

    enabled: bool = True
    bands: Annotated[tuple[Band, ...], Field(max_length=32)] = Field(default_factory=_mismatch_bands)
    growth: Annotated[tuple[GrowthSignal, ...], Field(max_length=16)] = (
        GrowthSignal(key="mismatch/abs_mean", min_abs=0.01),
        GrowthSignal(key="mismatch/kl_k3", min_abs=0.001),
        GrowthSignal(key="mismatch/chi2", min_abs=0.01),
        GrowthSignal(key="mismatch/prob_abs_mean", min_abs=0.005),
    )
    ratio: Annotated[float, Field(ge=1.5, le=1e6)] = 4.0
    idle_clip_ratio: Annotated[float, Field(ge=1.2, le=1e6)] = 2.0
    recent_steps: Annotated[int, Field(ge=1, le=200)] = 5
    reference_steps: Annotated[int, Field(ge=1, le=200)] = 10
    lookback_steps: Annotated[int, Field(ge=5, le=2_000)] = 100
    min_points: Annotated[int, Field(ge=1, le=2_000, description="warm-up: reference points needed")] = 10
    clip_keys: Annotated[tuple[Key, ...], Field(max_length=16)] = (
        "ratio/clip_frac",
        "ratio/clip_frac_low",
        "ratio/clip_frac_high",
    )
    refractory_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 200


class NonFiniteParams(_Strict):
    """`non_finite`: a scalar turns NaN or +-Infinity (fires when a key becomes non-finite)."""

    enabled: bool = True


class OnPolicyParams(_Strict):
    """`on_policy` (informational): every log-ratio exactly 0 for `min_steps` steps in a row."""

    enabled: bool = True
    min_steps: Annotated[int, Field(ge=1, le=10_000)] = 5
    keys: Annotated[tuple[Key, ...], Field(max_length=16)] = ("ratio/min", "ratio/max")


class ForecastParams(_Strict):
    """The entropy forecast (`mhpo_server.monitoring.forecast`), in points of the entropy series (one per
    rollout where the run logs `train/update_index`, else every logged point).

    The reference is the median of the first `reference_points` points; the level the median of
    the last `recent_points`; the trend the Theil-Sen slope over the last `trend_points`, confident
    when its Mann-Kendall z is at most -`z`, the level has lost `min_drop` of the reference, the
    trend is `acceleration` times steeper than the pace from the reference to the window's start (at
    least `before_points` points before it), and the
    crossing of `floor` x reference lies at most `horizon_steps` optimizer steps ahead.
    """

    reference_points: Annotated[int, Field(ge=1, le=200)] = 5
    recent_points: Annotated[int, Field(ge=1, le=200)] = 3
    trend_points: Annotated[int, Field(ge=5, le=500)] = 30
    floor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    z: Z = 3.5
    min_drop: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    horizon_steps: Annotated[int, Field(ge=1, le=100_000)] = 150
    acceleration: Annotated[float, Field(ge=0.0, le=1_000.0)] = 3.0
    before_points: Annotated[int, Field(ge=1, le=500)] = 30


class Corroboration(_Strict):
    """A second view of a collapse: `key` moving in `direction` over the forecast's trend window with a
    Mann-Kendall |z| of at least the forecast's `z`."""

    key: Key
    direction: Literal["up", "down"]


class RewardRise(_Strict):
    """The reward counts as rising when its Theil-Sen line over the last `window_points` rollouts climbs by
    at least `min_abs` (reward units). For `entropy_surge`: its recent median (`recent_points`) against
    its median when the climb of the entropy began."""

    key: Key = "reward/mean"
    recent_points: Annotated[int, Field(ge=1, le=200)] = 5
    window_points: Annotated[int, Field(ge=1, le=500)] = 30
    min_abs: Units = 0.05


class CollapseParams(_Strict):
    """`collapse`: the policy entropy under `warning_fraction` of its early reference at each of the
    last `hold_points` rollouts, `critical_fraction` for a critical; or, ahead of that state,
    a confident forecast of the crossing (`forecast`, when `forecast_warning`) that a second view
    corroborates: the log-prob/advantage covariance positive, or one of `corroborate` (group
    diversity falling) trending with it. An uncorroborated forecast is
    informational: entropy alone wanders by tens of percent in healthy runs.

    A rising reward (`reward_rise`) softens the message (the entropy may be spent on intended
    sharpening) and holds back the forecast warning; it never hides the state. One flag per
    episode: at the point where the state begins or worsens, then quiet for `refractory_steps`
    (shorter than the other kinds': a forecast that did not come true must not hold back the
    collapse that follows; long enough that a forecast and the state it foresaw are one flag).
    """

    enabled: bool = True
    key: Key = "policy/entropy"
    hold_points: Annotated[int, Field(ge=1, le=200)] = 2
    warning_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    critical_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    forecast_warning: bool = True
    forecast: ForecastParams = ForecastParams()
    # The mass of x > 0.2 is left out by default: the log-ratio spread widens in healthy runs too.
    corroborate: Annotated[tuple[Corroboration, ...], Field(max_length=8)] = (
        Corroboration(key="group/distinct_frac", direction="down"),
    )
    reward_rise: RewardRise = RewardRise()
    refractory_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 120


class SurgeParams(_Strict):
    """`entropy_surge`: the entropy's recent level (median of the last `recent_points` points) at least
    `ratio` x its early reference and `min_abs` above it, while the reward has not risen (`reward_rise`:
    its recent median against its median when the entropy was last at or under its reference, i.e.
    when the climb began, looked for at most `reward_rise.window_points` rollouts back: what the
    server keeps of a long run, so a batched run is judged as a whole one).

    The reference is the run's early level (`reference_points`), so a rebound after a dip back to
    where the run started is not a surge."""

    enabled: bool = True
    key: Key = "policy/entropy"
    reference_points: Annotated[int, Field(ge=1, le=200)] = 5
    recent_points: Annotated[int, Field(ge=1, le=200)] = 3
    ratio: Annotated[float, Field(gt=1.0, le=1_000.0)] = 1.4
    min_abs: Units = 0.1
    reward_rise: RewardRise = RewardRise()
    refractory_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 200


class NoSignalParams(_Strict):
    """`no_signal`: the run stopped learning.

    Either `degenerate_key` (the fraction of groups whose completions all got the same reward,
    TRL's `frac_reward_zero_std`: their group-relative advantages are 0) at least
    `degenerate_frac` at each of the last `degenerate_points` rollouts; or every key of
    `zero_keys` (gradient norm, loss) exactly 0 at each of the last `zero_points` steps.
    """

    enabled: bool = True
    degenerate_key: Key = "group/degenerate_frac"
    degenerate_frac: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    degenerate_points: Annotated[int, Field(ge=1, le=1_000)] = 5
    zero_keys: Annotated[tuple[Key, ...], Field(min_length=1, max_length=8)] = ("grad/norm", "train/loss")
    zero_points: Annotated[int, Field(ge=1, le=1_000)] = 5
    refractory_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 200


class TruncationParams(_Strict):
    """`truncation`: most completions cut at the length limit, or the cut fraction climbing to it.

    Warning when `key` (the fraction of completions without an end-of-sequence token) exceeds
    `max_frac` at each of the last `recent_points` rollouts; also when it has climbed to
    at least `climb_frac` and `climb_abs` above its early reference (median of the first
    `reference_points` rollouts) with a Mann-Kendall z of at least `z` over `trend_points`.
    """

    enabled: bool = True
    key: Key = "policy/truncated_frac"
    max_frac: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    recent_points: Annotated[int, Field(ge=1, le=200)] = 5
    reference_points: Annotated[int, Field(ge=1, le=200)] = 5
    climb_frac: Annotated[float, Field(gt=0.0, le=1.0)] = 0.4
    climb_abs: Annotated[float, Field(gt=0.0, le=1.0)] = 0.15
    trend_points: Annotated[int, Field(ge=5, le=500)] = 20
    z: Z = 3.0
    refractory_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 200


def _erosion() -> DriftParams:
    return DriftParams(
        signals=(
            Signal(key="ratio/frac_below_0.2", direction="up", min_abs=0.02, min_rel=1.0),
            Signal(key="policy/logp_mean", direction="down", min_abs=0.1, min_rel=0.3),
            Signal(key="policy/length_mean", direction="down", min_abs=1.0, min_rel=0.25),
        ),
        min_votes=2,
    )


def _kl_drift() -> DriftParams:
    return DriftParams(
        signals=(
            Signal(key="policy/kl_k3", direction="up", min_abs=0.05, min_rel=3.0),
            Signal(key="policy/kl_ref", direction="up", min_abs=0.05, min_rel=3.0),
        ),
        recent_steps=10,
        warning_votes=1,
        critical_votes=2,
    )


class FlagParams(_Strict):
    """Every detector's parameters; the defaults are set on `tests.flags.synthetic` streams and real runs."""

    collapse: CollapseParams = CollapseParams()
    erosion: DriftParams = Field(default_factory=_erosion)
    entropy_surge: SurgeParams = SurgeParams()
    no_signal: NoSignalParams = NoSignalParams()
    truncation: TruncationParams = TruncationParams()
    # zeta is bounded (4.61 with the paper's defaults, at x -> -inf) and MHPO attenuates the
    # gradient of the tokens out there: a p99 at that ceiling alone (1 % of the tokens far off,
    # the bulk unmoved) is the loss doing its job, seen in healthy runs; the mean moving is not.
    hazard_spike: SpikeParams = SpikeParams(
        keys=("hazard/zeta_mean", "hazard/zeta_p99"), min_ratio=1.5, min_scale=0.05, info_keys=("hazard/zeta_p99",)
    )
    grad_spike: SpikeParams = SpikeParams(keys=("grad/norm",), z=6.0, min_ratio=3.0, min_scale=0.1)
    kl_spike: SpikeParams = SpikeParams(
        keys=("policy/kl_k3", "policy/kl_ref"), z=6.0, min_ratio=5.0, min_abs=0.05, min_scale=0.1
    )
    kl_drift: DriftParams = Field(default_factory=_kl_drift)
    trust_region: TrustRegionParams = TrustRegionParams()
    mismatch: MismatchParams = MismatchParams()
    non_finite: NonFiniteParams = NonFiniteParams()
    on_policy: OnPolicyParams = OnPolicyParams()

    def merged(self, overrides: dict[str, Any] | None) -> FlagParams:
        """These parameters with a partial, nested `overrides` dict applied, validated strictly as JSON
        (no "0.5" for a number, no "false" for a bool, no NaN; a list such as `bounds` is replaced whole)."""
        if not overrides:
            return self
        merged = _deep_merge(self.model_dump(mode="json"), overrides)
        return FlagParams.model_validate_json(json.dumps(merged), strict=True)

    def drifts(self) -> dict[str, DriftParams]:
        """Drift detectors by the flag kind they raise."""
        return {"erosion": self.erosion, "kl_spike": self.kl_drift}

    def spikes(self) -> dict[str, SpikeParams]:
        """Spike detectors by the flag kind they raise."""
        return {"hazard_spike": self.hazard_spike, "grad_spike": self.grad_spike, "kl_spike": self.kl_spike}

    def history_steps(self) -> int:
        """How many points of a key the detectors read before the first new step.

        Twice the longest window: a signal judged on one kind of step (on- or off-policy)
        sees about half of a run's points when updates alternate; and the per-rollout windows
        of the state detectors times `UPDATES_PER_ROLLOUT`.
        """
        drift = max(max(p.baseline_steps + p.recent_steps, p.trend_steps) for p in self.drifts().values())
        spike = max(p.window_steps + 1 for p in self.spikes().values())
        m = self.mismatch
        mismatch = m.lookback_steps + m.recent_steps
        on_off = 2 * max(drift, spike, mismatch, self.on_policy.min_steps) + 2
        return max(on_off, UPDATES_PER_ROLLOUT * self._state_points())

    def _state_points(self) -> int:
        """The longest window of the state detectors, in points (rollouts)."""
        c, s, n, t = self.collapse, self.entropy_surge, self.no_signal, self.truncation
        r = max(
            c.reward_rise.recent_points + c.reward_rise.window_points,
            s.reward_rise.recent_points + s.reward_rise.window_points,
        )
        return max(
            c.forecast.trend_points + 1,
            c.forecast.recent_points + 1,
            c.hold_points + 1,
            s.recent_points + 1,
            r,
            n.degenerate_points + 1,
            n.zero_points + 1,
            t.trend_points + 1,
            t.recent_points + 1,
        )

    def head_keys(self) -> set[str]:
        """The keys whose first points the state detectors' early reference is taken from."""
        return {self.collapse.key, self.entropy_surge.key, self.truncation.key, *STEP_KIND_KEYS}

    def head_points(self) -> int:
        """How many of a key's first points the detectors read for its early reference (raw points: up to
        `UPDATES_PER_ROLLOUT` optimizer steps of each reference rollout)."""
        c, s, t = self.collapse, self.entropy_surge, self.truncation
        return UPDATES_PER_ROLLOUT * max(c.forecast.reference_points, s.reference_points, t.reference_points)

    def keys(self) -> set[str]:
        """The scalar keys any detector reads."""
        found = {s.key for p in self.drifts().values() for s in (*p.signals, *p.unless)}
        for p in self.spikes().values():
            found.update(p.keys)
        found.update(b.key for b in self.trust_region.bounds)
        found.update(b.key for bounds in self.trust_region.loss_bounds.values() for b in bounds)
        found.update(b.key for b in self.mismatch.bands)
        found.update(g.key for g in self.mismatch.growth)
        found.update(self.mismatch.clip_keys)
        found.update(self.on_policy.keys, STEP_KIND_KEYS, self.head_keys(), self.no_signal.zero_keys)
        found.update({self.collapse.reward_rise.key, self.entropy_surge.reward_rise.key, COV_KEY})
        found.update({self.no_signal.degenerate_key, *(c.key for c in self.collapse.corroborate)})
        return found


# Keys that say what kind of step a record is: its rollout and place in it, its valid tokens.
STEP_KIND_KEYS = ("train/rollout", "train/update_index", "tokens/valid", "ratio/min", "ratio/max")
# The log-prob/advantage covariance (Cui et al. 2025) the entropy forecast reads.
COV_KEY = "policy/cov_logp_adv"
# Optimizer steps per rollout the windows of the per-rollout detectors are sized for (e.g. 2 epochs x 4
# mini-batches); a run with more updates per rollout sees fewer rollouts in a window.
UPDATES_PER_ROLLOUT = 8


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = _deep_merge(out[name], value)
        else:
            out[name] = value
    return out


DEFAULT_PARAMS = FlagParams()
