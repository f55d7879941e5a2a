"""Dual-clip PPO (Ye et al., "Mastering Complex Control in MOBA Games", arXiv 1912.09729).

For A < 0 the clipped PPO loss is further capped at `-A * clip_c`, so a token whose ratio
has grown past `clip_c` cannot push an unbounded negative update; written as verl's
`compute_policy_loss_vanilla` (`clip_ratio_c`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.loss_specs import num
from mhpo.losses._registry import HParams, TokenInputs, register_loss
from mhpo.losses.grpo import ppo_clip, ppo_multiplier


def _multiplier(x: Tensor, adv: Tensor, hp: HParams) -> Tensor:
    """PPO's multiplier, and 0 for A < 0 beyond r > clip_c."""
    mult = ppo_multiplier(x, adv, num(hp, "eps"), num(hp, "eps"))
    return torch.where((adv < 0) & (torch.exp(x) > num(hp, "clip_c")), 0.0, mult)


@register_loss("dual_clip", multiplier=_multiplier)
def dual_clip_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Dual-clip per-token loss: L = -min(r*A, clip(r, 1-eps, 1+eps)*A), and for A < 0
    min(L, -A * clip_c). eps=0.2, clip_c=3, token-mean (verl's default aggregation).
    """
    adv = inputs.adv
    clipped = ppo_clip(torch.exp(inputs.x), adv, num(hp, "eps"), num(hp, "eps"))
    capped = torch.minimum(clipped, -adv * num(hp, "clip_c"))
    return torch.where(adv < 0, capped, clipped), {}
