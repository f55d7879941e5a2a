"""GRPO: the PPO clipped surrogate with group-relative advantages (DeepSeekMath, arXiv 2402.03300).

    l_t = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),   r = exp(x)

written as TRL's `GRPOTrainer` and verl's `compute_policy_loss_vanilla` write it. The
gradient multiplier is r inside the trust region and exactly 0 on the side the min
selects the clipped term: r > 1 + eps_high with A > 0, r < 1 - eps_low with A < 0.
`ppo_clip` and `ppo_multiplier` are shared with DAPO, dual-clip and GSPO.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.loss_specs import num
from mhpo.losses._registry import HParams, TokenInputs, register_loss


def ppo_clip(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A), elementwise."""
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)


def ppo_multiplier(x: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """r where the unclipped term is selected, else 0; A >= 0 takes the positive side."""
    ratio = torch.exp(x)
    inside = torch.where(adv >= 0, ratio <= 1.0 + eps_high, ratio >= 1.0 - eps_low)
    return torch.where(inside, ratio, 0.0)


@register_loss("grpo", multiplier=lambda x, adv, hp: ppo_multiplier(x, adv, num(hp, "eps"), num(hp, "eps")))
def grpo_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO per-token loss `-min(r*A, clip(r, 1-eps, 1+eps)*A)`, eps=0.2, seq-mean-token-mean.

    Source: DeepSeekMath (arXiv 2402.03300); TRL `GRPOTrainer._compute_loss`, verl
    `compute_policy_loss_vanilla`.
    """
    eps = num(hp, "eps")
    return ppo_clip(torch.exp(inputs.x), inputs.adv, eps, eps), {}
