"""CISPO: clipped importance-sampling-weight policy optimisation (MiniMax-M1, arXiv 2506.13585).

    l_t = -sg[clip(r, 1 - eps_low, 1 + eps_high)] * A * logp_t

The IS weight is truncated and detached, so every token keeps a gradient (-A times the
truncated weight); no lower clip unless `eps_low` is given. Written in TRL's form
(`loss_type="cispo"`), with the bound at 1 + eps_high as in the paper's notation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.loss_specs import num
from mhpo.losses._registry import HParams, TokenInputs, register_loss


def _weight(x: Tensor, hp: HParams) -> Tensor:
    eps_low = hp["eps_low"]
    low = None if eps_low is None else 1.0 - eps_low
    return torch.exp(x).clamp(min=low, max=1.0 + num(hp, "eps_high"))


@register_loss("cispo", multiplier=lambda x, adv, hp: _weight(x, hp))
def cispo_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO per-token loss; eps_high=5.0, eps_low=None (no lower clip), token-mean.

    The clip bounds (`clip_bounds`) are where the weight is truncated; unlike PPO's clip
    they never zero a gradient.
    """
    logp = torch.where(inputs.mask, inputs.logp, 0.0)
    return -_weight(inputs.x, hp).detach() * inputs.adv * logp, {}
