"""SAPO: Soft Adaptive Policy Optimization (Qwen, arXiv 2511.20347).

    l_t = -(4 / tau) * sigmoid(tau * (r - 1)) * A,   tau = tau_pos (A >= 0) or tau_neg (A < 0)

A smooth, temperature-controlled gate instead of a hard clip: the gradient multiplier
M = 4 * sigmoid(z) * (1 - sigmoid(z)) * r (z = tau * (r - 1)) is exactly 1 at r = 1 and
decays on both sides; tau_neg > tau_pos damps negative-advantage tokens faster
(TRL's `sapo_temperature_pos/neg`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.losses._registry import HParams, TokenInputs, register_loss, require


def _tau(adv: Tensor, hp: HParams) -> Tensor:
    tau_pos, tau_neg = float(hp["tau_pos"]), float(hp["tau_neg"])
    return torch.where(adv >= 0, tau_pos, tau_neg).to(adv.dtype)


def _multiplier(x: Tensor, adv: Tensor, hp: HParams) -> Tensor:
    """4 * sigmoid(z) * sigmoid(-z) * r, with its limit 0 at x = +inf."""
    tau = _tau(torch.broadcast_to(adv, x.shape), hp)
    z = tau * torch.expm1(x)
    mult = 4.0 * torch.exp(torch.nn.functional.logsigmoid(z) + torch.nn.functional.logsigmoid(-z) + x)
    return torch.where(torch.isposinf(x), 0.0, mult)


def _check(hp: HParams) -> None:
    for key in ("tau_pos", "tau_neg"):
        require(hp[key] is not None and hp[key] > 0, "sapo", key, hp[key], "> 0")


@register_loss(
    "sapo",
    defaults={"tau_pos": 1.0, "tau_neg": 1.05},
    agg="seq-mean-token-mean",
    multiplier=_multiplier,
    check=_check,
)
def sapo_token_loss(inputs: TokenInputs, hp: HParams) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO per-token loss `-(4/tau) * sigmoid(tau * (r - 1)) * A`; tau_pos=1.0, tau_neg=1.05,
    seq-mean-token-mean (SAPO, arXiv 2511.20347).
    """
    tau = _tau(inputs.adv, hp)
    gate = torch.sigmoid(tau * torch.expm1(inputs.x))
    return -(4.0 / tau) * gate * inputs.adv, {}
