"""The loss registry: `register_loss`, `get_loss`, `LOSSES`, and the shared input handling.

Every loss is written as a per-token function of already-checked, float32 (or float64),
masked-and-sanitised tensors; `PolicyLoss` wraps it with the public signature
(`loss(logp, old_logp, advantages, mask, agg=..., **hparams)`), the checks, the aggregation and
the `LossOutput` packing, so each loss module holds only its formula and multiplier; the
hyper-parameters, their rules and the clip bounds are declared in `mhpo.loss_specs` (torch-free). Nothing here reads a tensor value on the host: a loss call never
synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from mhpo.loss_specs import SPECS, Check, ClipBounds, HParams, LossSpec
from mhpo.losses.aggregation import aggregate


class LossOutput(NamedTuple):
    """What every registry loss returns.

    loss:  scalar tensor, differentiable w.r.t. `logp`.
    stats: detached tensors the diagnostics reuse (per-token ones are (B, T); their values
           on masked tokens are those of x = 0 and mean nothing); always holds "loss"
           (the detached scalar).
    """

    loss: Tensor
    stats: dict[str, Tensor]


class TokenInputs(NamedTuple):
    """The per-token tensors a loss formula sees, all (B, T).

    logp:  the caller's log-probs promoted to float32 (float64 stays float64), not sanitised.
    x:     log-ratio `logp - old_logp`, 0 on masked tokens (so inf/NaN there cannot leak).
    adv:   advantages broadcast to (B, T), 0 on masked tokens.
    mask:  bool, True on valid tokens.
    """

    logp: Tensor
    x: Tensor
    adv: Tensor
    mask: Tensor


TokenLoss = Callable[[TokenInputs, HParams], tuple[Tensor, dict[str, Tensor]]]
Multiplier = Callable[[Tensor, Tensor, HParams], Tensor]


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 (so gradcheck stays exact)."""
    return torch.promote_types(t.dtype, torch.float32)


def check_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    """Raise ValueError naming the argument whose shape, dtype or device is wrong."""
    named = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}; add a batch dimension")
    shape = tuple(logp.shape)
    for name in ("old_logp", "mask"):
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(named[name].shape)} but logp has shape {shape}; "
                "all per-token inputs must be (B, T)"
            )
    if tuple(advantages.shape) not in {shape, shape[:1]}:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected ({shape[0]},) or {shape} "
            "(one value per sequence or per token)"
        )
    for name in ("logp", "old_logp", "advantages"):
        if not named[name].is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {named[name].dtype}")
    for name, t in named.items():
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device} but logp is on {logp.device}; move it to one device")


def prepare(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> TokenInputs:
    """Checked inputs -> `TokenInputs`: promoted dtype, bool mask, masked tokens zeroed."""
    check_inputs(logp, old_logp, advantages, mask)
    dtype = compute_dtype(logp)
    valid = mask if mask.dtype == torch.bool else mask != 0
    logp_c = logp.to(dtype)
    x = torch.where(valid, logp_c - old_logp.to(dtype), 0.0)
    adv = advantages.to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    adv = torch.where(valid, adv, 0.0)
    return TokenInputs(logp=logp_c, x=x, adv=adv, mask=valid)


class PolicyLoss:
    """A registered loss: `loss(logp, old_logp, advantages, mask, agg=None, max_len=None, **hparams)`.

    Shapes: `logp`, `old_logp`, `mask` (B, T); `advantages` (B,) or (B, T). `agg` is one of
    `AGGREGATIONS` (default: the loss's own, `default_agg`); `max_len` is the constant
    divisor of "seq-mean-token-sum-norm" (default T). Hyper-parameters not given take
    `defaults`; an unknown name raises ValueError listing the valid ones.
    """

    def __init__(self, spec: LossSpec, token_loss: TokenLoss, multiplier: Multiplier) -> None:
        self.spec = spec
        self.name = spec.name
        self.token_loss = token_loss
        self.defaults: dict[str, float | None] = dict(spec.defaults)
        self.default_agg = spec.agg
        self._multiplier = multiplier
        self.__doc__ = token_loss.__doc__

    def __repr__(self) -> str:
        return f"PolicyLoss({self.name!r}, defaults={self.defaults}, agg={self.default_agg!r})"

    def resolve(self, **hparams: float | None) -> dict[str, float | None]:
        """Defaults overridden by `hparams`, validated; raises ValueError on unknown names or bad values."""
        return self.spec.resolve(**hparams)

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        agg: str | None = None,
        max_len: int | None = None,
        **hparams: float | None,
    ) -> LossOutput:
        hp = self.resolve(**hparams)
        agg = self.default_agg if agg is None else agg
        inputs = prepare(logp, old_logp, advantages, mask)
        per_token, stats = self.token_loss(inputs, hp)
        loss = aggregate(per_token, inputs.mask, agg, max_len=max_len)
        stats["loss"] = loss.detach()
        return LossOutput(loss=loss, stats=stats)

    def multiplier(self, x: Tensor, advantages: Tensor, **hparams: float | None) -> Tensor:
        """Per-token gradient multiplier M: d(per-token objective)/d logp = -A * M.

        `x` is the log-ratio (B, T) or any shape; `advantages` broadcastable to it (only its
        sign matters for the losses here). For "gspo", `x` is the sequence log-ratio.
        """
        return self._multiplier(x, advantages, self.resolve(**hparams))

    def clip_bounds(self, **hparams: float | None) -> tuple[float, float] | None:
        """Log-ratio bounds (low, high) of the loss's hard clip, None for losses without one."""
        return self.spec.bounds(**hparams)


LOSSES: dict[str, PolicyLoss] = {}


def register_loss(
    name: str,
    *,
    multiplier: Multiplier,
    defaults: HParams | None = None,
    agg: str | None = None,
    clip_bounds: ClipBounds | None = None,
    check: Check | None = None,
) -> Callable[[TokenLoss], TokenLoss]:
    """Decorator registering a per-token loss under `name`; a second registration is refused.

    A built-in loss passes only its `multiplier`: its defaults, aggregation, rules and clip
    bounds are those of `mhpo.loss_specs.SPECS`, which the torch-free curves read too. Any
    other loss gives `defaults` and `agg` (and optionally `clip_bounds`, `check`).
    """
    if defaults is None and agg is None and name in SPECS:
        spec = SPECS[name]
    elif defaults is None or agg is None:
        raise ValueError(f"loss {name!r}: give both defaults= and agg= (only the built-in losses may omit them)")
    else:
        spec = LossSpec(name, dict(defaults), agg, clip_bounds=clip_bounds or (lambda hp: None), check=check)

    def decorate(token_loss: TokenLoss) -> TokenLoss:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered; pick another name")
        LOSSES[name] = PolicyLoss(spec, token_loss, multiplier)
        return token_loss

    return decorate


def get_loss(name: str) -> PolicyLoss:
    """The registered loss `name`; an unknown name raises ValueError listing the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}") from None
