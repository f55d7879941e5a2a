"""Dual-clip PPO (Ye et al., "Mastering Complex Control in MOBA Games", arXiv 1912.09729).

For A < 0 the clipped PPO loss is further capped at `-A * clip_c`, so a token whose ratio
has grown past `clip_c` cannot push an unbounded negative update; written as verl's
`compute_policy_loss_vanilla` (`clip_ratio_c`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.losses._registry import HParams, TokenInputs, num, register_loss, require
from mhpo.losses.grpo import check_eps, log_bounds, ppo_clip, ppo_multiplier


def _multiplier(x: Tensor, adv: Tensor, hp: HParams) -> Tensor:
    """PPO's multiplier, and 0 for A < 0 beyond r > clip_c."""
    mult = ppo_multiplier(x, adv, num(hp, "eps"), num(hp, "eps"))
    return torch.where((adv < 0) & (torch.exp(x) > num(hp, "clip_c")), 0.0, mult)


def _check(hp: HParams) -> None:
    check_eps("dual_clip", hp, "eps", "eps")
    clip_c = hp["clip_c"]
    require(clip_c is not None and clip_c > 1 + num(hp, "eps"), "dual_clip", "clip_c", clip_c, "> 1 + eps")


@register_loss(
    "dual_clip",
    defaults={"eps": 0.2, "clip_c": 3.0},
    agg="token-mean",
    multiplier=_multiplier,
    clip_bounds=lambda hp: log_bounds(num(hp, "eps"), num(hp, "eps")),
    check=_check,
)
def dual_clip_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Dual-clip per-token loss: L = -min(r*A, clip(r, 1-eps, 1+eps)*A), and for A < 0
    min(L, -A * clip_c). eps=0.2, clip_c=3, token-mean (verl's default aggregation).
    """
    adv = inputs.adv
    clipped = ppo_clip(torch.exp(inputs.x), adv, num(hp, "eps"), num(hp, "eps"))
    capped = torch.minimum(clipped, -adv * num(hp, "clip_c"))
    return torch.where(adv < 0, capped, clipped), {}
