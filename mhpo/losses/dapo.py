"""DAPO: decoupled clip ("clip-higher") and token-level loss (arXiv 2503.14476)."""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.losses._registry import HParams, TokenInputs, num, register_loss
from mhpo.losses.grpo import check_eps, log_bounds, ppo_clip, ppo_multiplier


@register_loss(
    "dapo",
    defaults={"eps_low": 0.2, "eps_high": 0.28},
    agg="token-mean",
    multiplier=lambda x, adv, hp: ppo_multiplier(x, adv, num(hp, "eps_low"), num(hp, "eps_high")),
    clip_bounds=lambda hp: log_bounds(num(hp, "eps_low"), num(hp, "eps_high")),
    check=lambda hp: check_eps("dapo", hp, "eps_low", "eps_high"),
)
def dapo_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO per-token loss `-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`; eps_low=0.2,
    eps_high=0.28, token-mean (DAPO, arXiv 2503.14476; verl `clip_ratio_low/high`).
    """
    return ppo_clip(torch.exp(inputs.x), inputs.adv, num(hp, "eps_low"), num(hp, "eps_high")), {}
