"""GSPO: Group Sequence Policy Optimization (Qwen, arXiv 2507.18071), token form ("GSPO-token").

    log s_t = logp_t - sg[logp_t] + sg[mean_t x]      (masked mean over the sequence)
    l_t     = -min(s * A, clip(s, 1 - eps_low, 1 + eps_high) * A)

The value of s is the sequence ratio exp(mean x); its gradient reaches each token's own
logp (TRL's `importance_sampling_level="sequence_token"`). The multiplier is that of
PPO evaluated at the sequence log-ratio; the aggregation given is honoured.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.loss_specs import num
from mhpo.losses._registry import HParams, TokenInputs, register_loss
from mhpo.losses.grpo import ppo_clip, ppo_multiplier


def sequence_log_ratio(x: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of x per sequence, (B, T) -> (B,); 0 for a sequence without valid tokens."""
    return torch.where(mask, x, 0.0).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)


@register_loss("gspo", multiplier=lambda x, adv, hp: ppo_multiplier(x, adv, num(hp, "eps_low"), num(hp, "eps_high")))
def gspo_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token per-token loss; eps_low=3e-4, eps_high=4e-4, seq-mean-token-mean.

    Stats: "seq_log_ratio" (B,), the log of the sequence ratio s.
    """
    x = inputs.x
    seq = sequence_log_ratio(x, inputs.mask).detach()
    log_s = x - x.detach() + seq.unsqueeze(-1)
    per_token = ppo_clip(torch.exp(log_s), inputs.adv, num(hp, "eps_low"), num(hp, "eps_high"))
    return per_token, {"seq_log_ratio": seq}
