"""SAPO: Soft Adaptive Policy Optimization (Qwen, arXiv 2511.20347).

    l_t = -(4 / tau) * sigmoid(tau * (r - 1)) * A,   tau = tau_pos (A >= 0) or tau_neg (A < 0)

A smooth, temperature-controlled gate instead of a hard clip: the gradient multiplier
M = 4 * sigmoid(z) * (1 - sigmoid(z)) * r (z = tau * (r - 1)) is exactly 1 at r = 1 and
decays on both sides; tau_neg > tau_pos damps negative-advantage tokens faster
(TRL's `sapo_temperature_pos/neg`).

The loss's value is the formula (r - 1 as `expm1(x)`, exact near r = 1; the gate as
`1 - sigmoid(-z)` for z > 0). Its gradient is -A * M with M taken in log space
(`_multiplier`), not autograd's chain through the gate: that chain multiplies sigmoid's tail
`s * (1 - s)`, which cancels when s is near 1 and goes subnormal in float32 past z of about 87,
by tau * r, and loses a gradient the log-space form keeps (expm1's own backward also rounds to
0 for x below about -17 in float32). tau is built in the inputs' dtype, so float64 runs use
tau_neg = 1.05 exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.loss_specs import num
from mhpo.losses._registry import HParams, TokenInputs, register_loss


def _tau(adv: Tensor, hp: HParams) -> Tensor:
    tau_pos = torch.tensor(num(hp, "tau_pos"), dtype=adv.dtype, device=adv.device)
    tau_neg = torch.tensor(num(hp, "tau_neg"), dtype=adv.dtype, device=adv.device)
    return torch.where(adv >= 0, tau_pos, tau_neg)


def _multiplier(x: Tensor, adv: Tensor, hp: HParams) -> Tensor:
    """4 * sigmoid(z) * sigmoid(-z) * r, with its limit 0 at x = +inf."""
    tau = _tau(torch.broadcast_to(adv, x.shape), hp)
    z = tau * torch.expm1(x)
    mult = 4.0 * torch.exp(torch.nn.functional.logsigmoid(z) + torch.nn.functional.logsigmoid(-z) + x)
    return torch.where(torch.isposinf(x), 0.0, mult)


@register_loss("sapo", multiplier=_multiplier)
def sapo_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO per-token loss `-(4/tau) * sigmoid(tau * (r - 1)) * A`; tau_pos=1.0, tau_neg=1.05,
    seq-mean-token-mean (SAPO, arXiv 2511.20347).
    """
    x = inputs.x.detach()
    tau = _tau(inputs.adv, hp)
    z = tau * torch.expm1(x)
    gate = torch.where(z > 0, 1.0 - torch.sigmoid(-z), torch.sigmoid(z))
    slope = -inputs.adv * _multiplier(x, inputs.adv, hp)  # d loss / d x
    step = torch.where(torch.isfinite(x), inputs.x - x, 0.0)  # 0, with gradient 1 (0 where x is infinite)
    return -(4.0 / tau) * gate * inputs.adv + slope * step, {}
