"""DAPO: decoupled clip ("clip-higher") and token-level loss (arXiv 2503.14476)."""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.loss_specs import num
from mhpo.losses._registry import HParams, TokenInputs, register_loss
from mhpo.losses.grpo import ppo_clip, ppo_multiplier


@register_loss("dapo", multiplier=lambda x, adv, hp: ppo_multiplier(x, adv, num(hp, "eps_low"), num(hp, "eps_high")))
def dapo_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO per-token loss `-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`; eps_low=0.2,
    eps_high=0.28, token-mean (DAPO, arXiv 2503.14476; verl `clip_ratio_low/high`).
    """
    return ppo_clip(torch.exp(inputs.x), inputs.adv, num(hp, "eps_low"), num(hp, "eps_high")), {}
