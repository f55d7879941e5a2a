"""What each registry loss declares besides its formula: hyper-parameter defaults and rules, the
default aggregation and the log-ratio bounds of its hard clip.

This module is pure Python on purpose. The torch losses (`mhpo.losses`) and the numpy
multiplier curves the server draws (`mhpo.curves`) both read their hyper-parameters here, so a
serving install resolves and validates them exactly as training does, without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["AGGREGATIONS", "SPECS", "HParams", "LossSpec", "get_spec", "num", "require"]

HParams = Mapping[str, float | None]
ClipBounds = Callable[[HParams], tuple[float, float] | None]
Check = Callable[[HParams], None]

AGGREGATIONS: tuple[str, ...] = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")

MHPO_DEFAULTS: dict[str, float | None] = {"c": 1.5, "k_pos": 1.5, "lambda_pos": 1.0, "k_neg": 2.0, "lambda_neg": 0.8}


def require(condition: bool, loss: str, key: str, value: object, rule: str) -> None:
    """Raise ValueError `loss: key=value must ...` when a hyper-parameter breaks its rule."""
    if not condition:
        raise ValueError(f"{loss}: hyper-parameter {key}={value!r} must be {rule}")


def num(hp: HParams, key: str) -> float:
    """Hyper-parameter `key` as a float: for the ones whose check already refused None."""
    value = hp[key]
    if value is None:
        raise ValueError(f"hyper-parameter {key}=None must be a number; pass {key}=<float>")
    return float(value)


def _no_clip(hp: HParams) -> None:
    return None


@dataclass(frozen=True)
class LossSpec:
    """A loss's hyper-parameters (`defaults`, `check`), default aggregation and clip bounds."""

    name: str
    defaults: Mapping[str, float | None]
    agg: str
    clip_bounds: ClipBounds = _no_clip
    check: Check | None = field(default=None)

    def __post_init__(self) -> None:
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"loss {self.name!r}: default agg {self.agg!r} is not one of {', '.join(AGGREGATIONS)}")

    def resolve(self, **hparams: float | None) -> dict[str, float | None]:
        """Defaults overridden by `hparams`, validated; raises ValueError on unknown names or bad values."""
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "(none)"
            raise ValueError(f"unknown hyper-parameter {', '.join(unknown)} for loss {self.name!r}; valid: {valid}")
        hp = {**self.defaults, **hparams}
        for key, value in hp.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{self.name}: hyper-parameter {key}={value!r} must be a finite number")
        if self.check is not None:
            self.check(hp)
        return hp

    def bounds(self, **hparams: float | None) -> tuple[float, float] | None:
        """Log-ratio bounds (low, high) of the hard clip for these hyper-parameters, None without one."""
        return self.clip_bounds(self.resolve(**hparams))


def check_eps(loss: str, hp: HParams, low: str, high: str) -> None:
    lo, hi = hp[low], hp[high]
    require(lo is not None and 0 < lo < 1, loss, low, lo, "in (0, 1)")
    require(hi is not None and hi > 0, loss, high, hi, "> 0")


def log_bounds(eps_low: float, eps_high: float) -> tuple[float, float]:
    """(log(1 - eps_low), log(1 + eps_high)): PPO's ratio window in log-ratio units."""
    return math.log(1.0 - eps_low), math.log(1.0 + eps_high)


def _positive(loss: str, keys: tuple[str, ...]) -> Check:
    def check(hp: HParams) -> None:
        for key in keys:
            value = hp[key]
            require(value is not None and value > 0, loss, key, value, "> 0")

    return check


def _check_dual_clip(hp: HParams) -> None:
    check_eps("dual_clip", hp, "eps", "eps")
    clip_c = hp["clip_c"]
    require(clip_c is not None and clip_c > 1 + num(hp, "eps"), "dual_clip", "clip_c", clip_c, "> 1 + eps")


def _check_cispo(hp: HParams) -> None:
    eps_high, eps_low = hp["eps_high"], hp["eps_low"]
    require(eps_high is not None and eps_high > 0, "cispo", "eps_high", eps_high, "> 0")
    if eps_low is not None:
        require(0 < eps_low < 1, "cispo", "eps_low", eps_low, "in (0, 1) or None")


def _cispo_bounds(hp: HParams) -> tuple[float, float]:
    eps_low = hp["eps_low"]
    low = -math.inf if eps_low is None else math.log(1.0 - eps_low)
    return low, math.log(1.0 + num(hp, "eps_high"))


def _ppo_bounds(low: str, high: str) -> ClipBounds:
    return lambda hp: log_bounds(num(hp, low), num(hp, high))


# The built-in losses, in the order of `mhpo.losses.LOSSES`.
SPECS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("mhpo", MHPO_DEFAULTS, "seq-mean-token-mean", check=_positive("mhpo", tuple(MHPO_DEFAULTS))),
        LossSpec(
            "grpo",
            {"eps": 0.2},
            "seq-mean-token-mean",
            clip_bounds=_ppo_bounds("eps", "eps"),
            check=lambda hp: check_eps("grpo", hp, "eps", "eps"),
        ),
        LossSpec(
            "dapo",
            {"eps_low": 0.2, "eps_high": 0.28},
            "token-mean",
            clip_bounds=_ppo_bounds("eps_low", "eps_high"),
            check=lambda hp: check_eps("dapo", hp, "eps_low", "eps_high"),
        ),
        LossSpec(
            "dual_clip",
            {"eps": 0.2, "clip_c": 3.0},
            "token-mean",
            clip_bounds=_ppo_bounds("eps", "eps"),
            check=_check_dual_clip,
        ),
        LossSpec(
            "gspo",
            {"eps_low": 3e-4, "eps_high": 4e-4},
            "seq-mean-token-mean",
            clip_bounds=_ppo_bounds("eps_low", "eps_high"),
            check=lambda hp: check_eps("gspo", hp, "eps_low", "eps_high"),
        ),
        LossSpec(
            "sapo",
            {"tau_pos": 1.0, "tau_neg": 1.05},
            "seq-mean-token-mean",
            check=_positive("sapo", ("tau_pos", "tau_neg")),
        ),
        LossSpec(
            "cispo",
            {"eps_high": 5.0, "eps_low": None},
            "token-mean",
            clip_bounds=_cispo_bounds,
            check=_check_cispo,
        ),
    )
}


def get_spec(name: str) -> LossSpec:
    """The built-in loss `name`'s spec; an unknown name raises ValueError listing the valid ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(SPECS))}") from None
