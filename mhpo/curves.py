"""Gradient-multiplier curves M(x) of the registry losses, for the dashboard's trust-region plot.

The dashboard draws, over the log-ratio histogram, how strongly each objective pushes a
token at log-ratio x: the per-token gradient w.r.t. logp is -A * M(x). The curves use
the same torch code as the losses and the diagnostics (`PolicyLoss.multiplier`), in
float64. For "gspo", x is the sequence log-ratio (a one-token sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mhpo.losses import get_loss

__all__ = ["clip_bounds", "multiplier"]


def multiplier(loss: str, x: Sequence[float] | np.ndarray, adv_sign: float, **hparams: float | None) -> np.ndarray:
    """M(x) of `loss` for advantages of sign `adv_sign` (> 0 or < 0), as a float64 array shaped like x.

    Hyper-parameters default to the loss's own; unknown names raise ValueError.
    """
    if not isinstance(adv_sign, (int, float)) or isinstance(adv_sign, bool) or not adv_sign or adv_sign != adv_sign:
        raise ValueError(f"adv_sign={adv_sign!r} must be a non-zero number: +1 for A > 0, -1 for A < 0")
    grid = torch.as_tensor(np.asarray(x, dtype=np.float64))
    adv = torch.full_like(grid, 1.0 if adv_sign > 0 else -1.0)
    return get_loss(loss).multiplier(grid, adv, **hparams).numpy()


def clip_bounds(loss: str, **hparams: float | None) -> tuple[float, float] | None:
    """Log-ratio bounds (log(1 - eps_low), log(1 + eps_high)) of the loss's hard clip, or None.

    None for the smooth objectives ("mhpo", "sapo"). For "cispo" the bounds are where the
    IS weight is truncated (the low one -inf unless eps_low is set); for "dual_clip" the
    PPO window (its extra A < 0 cap at log(clip_c) shows in `multiplier`).
    """
    return get_loss(loss).clip_bounds(**hparams)
