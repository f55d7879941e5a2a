"""Labelled synthetic streams that look like GRPO-family runs, for the detector tests and bench/detect.py.

Each stream carries the product's metric names (the clip fraction and update-to-weight ratio
included, below the trust-region bounds) with per-run levels drawn at random,
slow trends (entropy decays, rewards rise, the ratio spread widens), AR(1) drift and
per-step noise (multiplicative log-normal for scale metrics such as the grad-norm), and
optionally one injected event at a random onset:

- `collapse`: entropy decays to 5-20 % of its level (a collapse: under a quarter of its early
  level) with a time constant of 8-30 steps,
  the mass of x > 0.2 grows 5-20x, group diversity falls;
- `erosion`: the mass of x < -0.2 and the low clip fraction grow 5-20x, the sampled-token
  log-prob falls 1.6-3x, completion length shrinks to 30-60 %;
- `hazard_spike`: zeta mean x1.5-3 and p99 x4-20 for 1-2 steps;
- `grad_spike`: the grad-norm x5-30 for 1-2 steps;
- `non_finite`: the grad-norm turns +Infinity for 1-3 steps and the loss NaN at the onset;
- `on_policy`: from the onset every log-ratio statistic is exactly 0.

Everything is a function of the seed, so a test or a benchmark reproduces exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# What a step without any valid token still logs (no statistic that needs a token).
NO_TOKEN_KEYS = frozenset({"tokens/valid", "train/lr", "train/loss", "reward/mean", "group/distinct_frac"})
INJECTED_KINDS = ("collapse", "erosion", "hazard_spike", "grad_spike", "non_finite", "on_policy")


@dataclass
class Stream:
    """One run: `scalars[key][i]` is the value at step i; `kind`/`onset` label the injected event."""

    seed: int
    n_steps: int
    scalars: dict[str, np.ndarray]
    kind: str | None = None
    onset: int | None = None
    empty: np.ndarray | None = None  # steps with no valid token: only `NO_TOKEN_KEYS` are logged there

    def _logged(self, key: str, i: int) -> bool:
        return self.empty is None or not self.empty[i] or key in NO_TOKEN_KEYS

    def records(self, start: int = 0, stop: int | None = None, t0: float = 1.7e9) -> list[dict[str, Any]]:
        """C1 records for steps [start, stop)."""
        stop = self.n_steps if stop is None else min(stop, self.n_steps)
        return [
            {
                "step": i,
                "time": t0 + i,
                "scalars": {k: float(v[i]) for k, v in self.scalars.items() if self._logged(k, i)},
            }
            for i in range(start, stop)
        ]

    def points(self, stop: int | None = None) -> dict[str, dict[int, float]]:
        """key -> {step: value} up to `stop` (exclusive), the shape `History` takes."""
        stop = self.n_steps if stop is None else min(stop, self.n_steps)
        return {k: {i: float(v[i]) for i in range(stop) if self._logged(k, i)} for k, v in self.scalars.items()}


def _ar1(rng: np.random.Generator, n: int, rho: float, sd: float) -> np.ndarray:
    """Stationary AR(1) noise with marginal standard deviation `sd` (slow drift)."""
    eps = rng.normal(0.0, sd * math.sqrt(1 - rho**2), n)
    out = np.empty(n)
    out[0] = rng.normal(0.0, sd)
    for i in range(1, n):
        out[i] = rho * out[i - 1] + eps[i]
    return out


def _ramp(n: int, onset: int, tau: float) -> np.ndarray:
    """0 before `onset`, then 1 - exp(-(t - onset) / tau): the shape of a runaway event."""
    t = np.arange(n, dtype=np.float64) - onset
    return np.where(t >= 0, 1.0 - np.exp(-np.maximum(t + 1, 0) / tau), 0.0)


def generate_stream(seed: int, n_steps: int = 400, kind: str | None = None, onset: int | None = None) -> Stream:
    """A GRPO-family-looking run of `n_steps` steps, clean (`kind=None`) or with one injected event.

    The onset is drawn uniformly in [n_steps/4, n_steps - 80] unless given.
    """
    if kind is not None and kind not in INJECTED_KINDS:
        raise ValueError(f"kind={kind!r} is not an injectable event; use one of {', '.join(INJECTED_KINDS)} or None")
    rng = np.random.default_rng(seed)
    n = n_steps
    t = np.arange(n) / max(n - 1, 1)
    if kind is not None and onset is None:
        onset = int(rng.integers(n // 4, max(n // 4 + 1, n - 80)))

    def noisy(sd: float, df: float | None = None) -> np.ndarray:
        """Multiplicative noise: slow AR(1) drift times per-step noise (Student-t when `df`, heavy-tailed)."""
        step = rng.normal(0.0, sd, n) if df is None else sd * rng.standard_t(df, n)
        return np.exp(_ar1(rng, n, 0.95, sd) + step)

    spread = rng.uniform(0.03, 0.08) * (1 + 0.3 * t) * noisy(0.04)  # std of x
    tail = spread / math.sqrt(2)  # Laplace scale: heavier tails than a Gaussian, as seen in practice
    frac_above = 0.5 * np.exp(-0.2 / tail) * noisy(0.08)
    frac_below = 0.5 * np.exp(-0.2 / tail) * noisy(0.08)
    clip_low = 0.5 * frac_below * noisy(0.08)
    clip_high = 0.5 * np.exp(-0.28 / tail) * noisy(0.08)
    entropy = rng.uniform(0.6, 1.6) * (1 - 0.25 * t) * noisy(0.03, df=5)
    logp = -rng.uniform(0.8, 1.0) * entropy * noisy(0.03)
    length = rng.uniform(150, 600) * (1 + 0.2 * t) * noisy(0.05)
    distinct = np.clip(rng.uniform(0.7, 0.95) + _ar1(rng, n, 0.9, 0.015) + rng.normal(0, 0.015, n), 0.0, 1.0)
    grad = rng.uniform(0.2, 2.0) * np.exp(-0.3 * t) * noisy(0.12, df=5)
    zeta_mean = (1.328 + 2.0 * spread**2) * noisy(0.01)
    zeta_p99 = (1.4 + 40.0 * spread**2) * noisy(0.04, df=5)
    reward = np.clip(rng.uniform(0.1, 0.3) + 0.3 * t + _ar1(rng, n, 0.9, 0.02) + rng.normal(0, 0.03, n), 0, 1)
    ratio_mean = rng.normal(0.0, 0.002, n)
    lr = np.full(n, 1e-6) * np.minimum(1.0, (np.arange(n) + 1) / 20)

    if kind == "collapse":
        assert onset is not None
        ramp = _ramp(n, onset, rng.uniform(8, 30))
        entropy = entropy * (1 - ramp * (1 - rng.uniform(0.05, 0.2)))
        logp = logp * (1 - 0.8 * ramp)
        frac_above = frac_above * (1 + ramp * rng.uniform(4, 19)) + 0.03 * ramp
        distinct = distinct * (1 - ramp * rng.uniform(0.4, 0.8))
        zeta_mean = zeta_mean * (1 + 0.3 * ramp)
        reward = reward * (1 - 0.5 * _ramp(n, onset + 40, 20))
    elif kind == "erosion":
        assert onset is not None
        ramp = _ramp(n, onset, rng.uniform(8, 30))
        grow = rng.uniform(4, 19)
        frac_below = frac_below * (1 + ramp * grow) + 0.03 * ramp
        clip_low = clip_low * (1 + ramp * grow) + 0.02 * ramp
        logp = logp * (1 + ramp * rng.uniform(0.6, 2.0))
        length = length * (1 - ramp * rng.uniform(0.4, 0.7))
        reward = reward * (1 - 0.5 * _ramp(n, onset + 40, 20))
    elif kind in ("hazard_spike", "grad_spike", "non_finite"):
        assert onset is not None
        width = int(rng.integers(1, 3 if kind != "non_finite" else 4))
        sl = slice(onset, min(n, onset + width))
        if kind == "hazard_spike":
            zeta_mean[sl] *= rng.uniform(1.5, 3.0)
            zeta_p99[sl] *= rng.uniform(4.0, 20.0)
        elif kind == "grad_spike":
            grad[sl] *= rng.uniform(5.0, 30.0)
        else:
            grad[sl] = math.inf
    # Drawn last, so the streams of the keys above stay what they were before these keys were added.
    update_ratio = rng.uniform(5e-4, 4e-3) * np.exp(-0.3 * t) * noisy(0.1)
    scalars = {
        "ratio/mean": ratio_mean,
        "ratio/std": spread,
        "ratio/min": -spread * rng.uniform(8, 12),
        "ratio/max": spread * rng.uniform(8, 12),
        "ratio/p50": rng.normal(0.0, 0.001, n),
        "ratio/pos_mass": np.clip(0.5 + rng.normal(0, 0.01, n), 0, 1),
        "ratio/frac_above_0.2": np.clip(frac_above, 0, 1),
        "ratio/frac_below_0.2": np.clip(frac_below, 0, 1),
        "ratio/clip_frac_low": np.clip(clip_low, 0, 1),
        "ratio/clip_frac_high": np.clip(clip_high, 0, 1),
        "ratio/clip_frac": np.clip(clip_low + clip_high, 0, 1),
        "hazard/zeta_mean": zeta_mean,
        "hazard/zeta_p99": zeta_p99,
        "hazard/survival_mean": np.exp(-zeta_mean),
        "grad/norm": grad,
        "grad/update_ratio": update_ratio,
        "policy/entropy": entropy,
        "policy/kl_k3": spread**2 / 2 * noisy(0.05),
        "policy/logp_mean": logp,
        "policy/length_mean": length,
        "reward/mean": reward,
        "group/distinct_frac": distinct,
        "train/loss": rng.normal(0.0, 0.02, n),
        "train/lr": lr,
    }
    if kind == "non_finite":
        assert onset is not None
        scalars["train/loss"][onset] = math.nan
    if kind == "on_policy":
        assert onset is not None
        for key in ("ratio/mean", "ratio/std", "ratio/min", "ratio/max", "ratio/p50", "policy/kl_k3"):
            scalars[key][onset:] = 0.0
        for key in (
            "ratio/frac_above_0.2",
            "ratio/frac_below_0.2",
            "ratio/clip_frac_low",
            "ratio/clip_frac_high",
            "ratio/clip_frac",
        ):
            scalars[key][onset:] = 0.0
        scalars["ratio/pos_mass"][onset:] = 0.0
    return Stream(seed=seed, n_steps=n, scalars=scalars, kind=kind, onset=onset)


def generate_suite(
    seed: int = 0, per_kind: int = 10, n_steps: int = 400, clean: int = 10, clean_steps: int = 2000
) -> list[Stream]:
    """`per_kind` streams of each injected kind plus `clean` clean streams of `clean_steps` steps."""
    injected = [
        generate_stream(seed * 1_000_003 + 1000 * (k + 1) + i, n_steps, kind)
        for k, kind in enumerate(INJECTED_KINDS)
        for i in range(per_kind)
    ]
    return injected + [generate_stream(seed * 1_000_003 + 100_000 + i, clean_steps, None) for i in range(clean)]


GOAL_DELAY = {"collapse": 30, "erosion": 30, "hazard_spike": 2, "grad_spike": 2, "non_finite": 0, "on_policy": 10}


@dataclass
class Score:
    """Per kind: detected/total within the goal delay, delays, and false flags on clean steps."""

    detected: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    delays: dict[str, list[int]] = field(default_factory=dict)
    false_flags: int = 0
    clean_steps: int = 0
    false_by_kind: dict[str, int] = field(default_factory=dict)

    def false_per_1000(self) -> float:
        return 1000.0 * self.false_flags / max(self.clean_steps, 1)


def score(streams: list[Stream], flags: list[list[tuple[str, int]]]) -> Score:
    """Score `(kind, step)` flags per stream against the labels.

    A stream with an injected event counts as detected when a flag of its kind comes at
    or after the onset within `GOAL_DELAY[kind]` steps. A false flag is any flag on a
    clean stream, or any flag before the onset of an injected stream (those steps count
    as clean steps).
    """
    out = Score()
    for stream, found in zip(streams, flags, strict=True):
        clean_until = stream.n_steps if stream.kind is None else int(stream.onset or 0)
        out.clean_steps += clean_until
        for kind, step in found:
            if step < clean_until:
                out.false_flags += 1
                out.false_by_kind[kind] = out.false_by_kind.get(kind, 0) + 1
        if stream.kind is None:
            continue
        kind, onset = stream.kind, int(stream.onset or 0)
        out.total[kind] = out.total.get(kind, 0) + 1
        out.detected.setdefault(kind, 0)
        hits = sorted(step - onset for k, step in found if k == kind and step >= onset)
        if hits and hits[0] <= GOAL_DELAY[kind]:
            out.detected[kind] += 1
        if hits:
            out.delays.setdefault(kind, []).append(hits[0])
    return out


PATTERNS = ("linear_entropy", "geometric_entropy", "entropy_blowup", "kl_jump", "alternating", "empty_steps")
PATTERN_KIND = {
    "linear_entropy": "collapse",
    "geometric_entropy": "collapse",
    "entropy_blowup": "entropy_surge",
    "kl_jump": "kl_spike",
}


def pattern_stream(pattern: str, seed: int, n_steps: int = 400, onset: int = 150) -> Stream:
    """A clean stream (every key logged, its noise kept) with one of the reported failure shapes from `onset`.

    - `linear_entropy` / `geometric_entropy`: entropy 1.2 -> 0.05 over 200 steps, linearly
      or geometrically (the slow collapse of long runs), every other key unchanged;
    - `entropy_blowup`: entropy 0.5 -> 2.0 over 100 steps while the reward falls by half;
    - `kl_jump`: `policy/kl_k3` x100 from the onset on;
    - `alternating`: no event; updates alternate on-policy (`train/update_index` 0, every
      log-ratio statistic exactly 0) and off-policy, as with two mini-batches per rollout,
      the rollout-level reward and diversity repeated for both (`train/rollout`);
    - `empty_steps`: no event; every 25th step has no valid token (`tokens/valid` 0 and
      only the keys that need no token).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r} is unknown; use one of {', '.join(PATTERNS)}")
    stream = generate_stream(seed, n_steps, None)
    s = stream.scalars
    t = np.arange(n_steps, dtype=np.float64) - onset
    ramp = np.clip(t / 200.0, 0.0, 1.0)
    noise = s["policy/entropy"] / np.median(s["policy/entropy"])
    kind: str | None = PATTERN_KIND.get(pattern)
    if pattern == "linear_entropy":
        s["policy/entropy"] = (1.2 - 1.15 * ramp) * noise
    elif pattern == "geometric_entropy":
        s["policy/entropy"] = 1.2 * (0.05 / 1.2) ** ramp * noise
    elif pattern == "entropy_blowup":
        up = np.clip(t / 100.0, 0.0, 1.0)
        s["policy/entropy"] = (0.5 + 1.5 * up) * noise
        s["reward/mean"] = s["reward/mean"] * (1.0 - 0.5 * up)
    elif pattern == "kl_jump":
        s["policy/kl_k3"] = s["policy/kl_k3"] * np.where(t >= 0, 100.0, 1.0)
    elif pattern == "alternating":
        on = np.arange(n_steps) % 2 == 0
        s["train/update_index"] = np.where(on, 0.0, 1.0)
        s["train/rollout"] = (np.arange(n_steps) // 2).astype(np.float64)
        for key in ("reward/mean", "group/distinct_frac"):  # rollout-level: streamed with both updates
            s[key] = np.repeat(s[key][::2], 2)[:n_steps]
        for key in (
            "ratio/mean",
            "ratio/std",
            "ratio/min",
            "ratio/max",
            "ratio/p50",
            "ratio/pos_mass",
            "ratio/frac_above_0.2",
            "ratio/frac_below_0.2",
            "ratio/clip_frac_low",
            "ratio/clip_frac_high",
            "ratio/clip_frac",
            "policy/kl_k3",
        ):
            s[key] = np.where(on, 0.0, s[key])
        s["hazard/zeta_mean"] = np.where(on, 1.3278, s["hazard/zeta_mean"])
        s["hazard/zeta_p99"] = np.where(on, 1.3278, s["hazard/zeta_p99"])
    elif pattern == "empty_steps":
        stream.empty = np.arange(n_steps) % 25 == 24
        s["tokens/valid"] = np.where(stream.empty, 0.0, 4096.0)
    stream.kind, stream.onset = kind, (onset if kind is not None else None)
    return stream
