"""Gradient-multiplier curves M(x) of the registry losses, for the dashboard's trust-region plot.

The dashboard draws, over the log-ratio histogram, how strongly each objective pushes a
token at log-ratio x: the per-token gradient w.r.t. logp is -A * M(x). The server draws
these, and a serving install has no torch, so each loss's M is written here again in numpy
(float64), beside the torch `PolicyLoss.multiplier` the losses and diagnostics use; a
property test holds the two equal over random log-ratios and hyper-parameters. Defaults,
rules and clip bounds are not repeated: both read `mhpo.loss_specs`. For "gspo", x is the
sequence log-ratio (a one-token sequence).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from mhpo.loss_specs import HParams, get_spec, num

__all__ = ["MULTIPLIERS", "clip_bounds", "multiplier"]

# M(x, positive advantage?, resolved hyper-parameters) -> float64 array shaped like x.
CurveFn = Callable[[np.ndarray, bool, HParams], np.ndarray]


def _softplus(t: np.ndarray) -> np.ndarray:
    """log(1 + e^t), returning t above 20 exactly as torch's `softplus` does."""
    return np.where(t > 20.0, t, np.logaddexp(0.0, t))


def _mhpo(x: np.ndarray, positive: bool, hp: HParams) -> np.ndarray:
    """exp(psi - zeta) * sech^2(x / c), the same for both advantage signs."""
    c = num(hp, "c")
    u = x / c
    psi = c * np.tanh(u)
    sp = _softplus(psi)
    zeta_pos = (sp / num(hp, "lambda_pos")) ** num(hp, "k_pos")
    zeta_neg = ((sp - psi) / num(hp, "lambda_neg")) ** num(hp, "k_neg")
    return np.exp(psi - zeta_pos - zeta_neg) / np.cosh(u) ** 2


def _ppo(x: np.ndarray, positive: bool, eps_low: float, eps_high: float) -> np.ndarray:
    """r where the unclipped term is selected, else 0 (A > 0 drops r > 1 + eps_high, A < 0 r < 1 - eps_low)."""
    ratio = np.exp(x)
    inside = ratio <= 1.0 + eps_high if positive else ratio >= 1.0 - eps_low
    return np.where(inside, ratio, 0.0)


def _dual_clip(x: np.ndarray, positive: bool, hp: HParams) -> np.ndarray:
    mult = _ppo(x, positive, num(hp, "eps"), num(hp, "eps"))
    return mult if positive else np.where(np.exp(x) > num(hp, "clip_c"), 0.0, mult)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def _sapo(x: np.ndarray, positive: bool, hp: HParams) -> np.ndarray:
    """4 * sigmoid(z) * sigmoid(-z) * r with z = tau * (r - 1), and its limit 0 at x = +inf."""
    z = num(hp, "tau_pos" if positive else "tau_neg") * np.expm1(x)
    mult = 4.0 * np.exp(_log_sigmoid(z) + _log_sigmoid(-z) + x)
    return np.where(np.isposinf(x), 0.0, mult)


def _cispo(x: np.ndarray, positive: bool, hp: HParams) -> np.ndarray:
    """The truncated IS weight clip(r, 1 - eps_low, 1 + eps_high): every token keeps a gradient."""
    weight = np.minimum(np.exp(x), 1.0 + num(hp, "eps_high"))
    return weight if hp["eps_low"] is None else np.maximum(weight, 1.0 - num(hp, "eps_low"))


MULTIPLIERS: dict[str, CurveFn] = {
    "mhpo": _mhpo,
    "grpo": lambda x, pos, hp: _ppo(x, pos, num(hp, "eps"), num(hp, "eps")),
    "dapo": lambda x, pos, hp: _ppo(x, pos, num(hp, "eps_low"), num(hp, "eps_high")),
    "dual_clip": _dual_clip,
    "gspo": lambda x, pos, hp: _ppo(x, pos, num(hp, "eps_low"), num(hp, "eps_high")),
    "sapo": _sapo,
    "cispo": _cispo,
}


def multiplier(loss: str, x: Sequence[float] | np.ndarray, adv_sign: float, **hparams: float | None) -> np.ndarray:
    """M(x) of `loss` for advantages of sign `adv_sign` (> 0 or < 0), as a float64 array shaped like x.

    Hyper-parameters default to the loss's own; unknown names raise ValueError.
    """
    if not isinstance(adv_sign, (int, float)) or isinstance(adv_sign, bool) or not adv_sign or math.isnan(adv_sign):
        raise ValueError(f"adv_sign={adv_sign!r} must be a non-zero number: +1 for A > 0, -1 for A < 0")
    hp = get_spec(loss).resolve(**hparams)
    grid = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # exp/cosh overflow to inf is the intended limit
        return np.asarray(MULTIPLIERS[loss](grid, adv_sign > 0, hp), dtype=np.float64)


def clip_bounds(loss: str, **hparams: float | None) -> tuple[float, float] | None:
    """Log-ratio bounds (log(1 - eps_low), log(1 + eps_high)) of the loss's hard clip, or None.

    None for the smooth objectives ("mhpo", "sapo"). For "cispo" the bounds are where the
    IS weight is truncated (the low one -inf unless eps_low is set); for "dual_clip" the
    PPO window (its extra A < 0 cap at log(clip_c) shows in `multiplier`).
    """
    return get_spec(loss).bounds(**hparams)
