"""Token-level corrections for a sampler that disagrees with the trainer (`--is-correction`).

With `w = exp(old_logp - rollout_logp)` the trainer-to-sampler ratio of a sampled token (the
sampler drew it, the trainer's policy is the one being optimised), each token's policy loss is
multiplied by a detached weight:
- `tis`, truncated importance sampling: `min(w, cap)`. TRL's `vllm_importance_sampling_mode=
  "token_truncate"` (`torch.clamp(ratio, max=vllm_importance_sampling_clip_max)`, cap 3.0 by
  default) and verl's `rollout_is="token"` with a single `rollout_is_threshold` (TIS, 2.0 by
  default: `raw_rollout_is_weights.clamp(max=rollout_is_threshold_upper)`).
- `mis`, masked importance sampling: `w`, and 0 where `w > cap` (the token still counts in the
  aggregation's denominators). TRL's `"token_mask"` (`ratio.masked_fill(ratio > clip_max, 0)`);
  verl's IcePop (`rollout_is_threshold="lower_upper"`: zero weights outside the band) with no
  lower bound.
As in verl, `w` is computed from a log-ratio clamped to +-20. Every registry loss is linear in
the advantage and the weight is >= 0, so the trainer applies it as a per-token advantage:
`loss(A * weight)` is the per-token loss times the weight, exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

CORRECTIONS = ("none", "tis", "mis")
SAFETY_BOUND = 20.0


class Correction(NamedTuple):
    weight: Tensor  # (B, T) detached, 0 on masked tokens
    changed: Tensor  # (B, T) bool: valid tokens whose weight the cap truncated or masked


def correction_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, mode: str, cap: float) -> Correction:
    """The per-token weights of `mode` ("tis" or "mis") with upper bound `cap` (see the module docstring)."""
    if mode not in ("tis", "mis"):
        raise ValueError(f"is_correction={mode!r} has no weights; use tis or mis (or none for no correction)")
    if not cap > 0:
        raise ValueError(f"is_cap={cap} must be > 0")
    valid = mask.bool()
    log_w = torch.where(valid, old_logp.float() - rollout_logp.float(), 0.0).nan_to_num(nan=0.0)  # TRL: NaN -> 1
    w = torch.exp(log_w.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    over = (w > cap) & valid
    weight = w.clamp(max=cap) if mode == "tis" else w.masked_fill(over, 0.0)
    return Correction(torch.where(valid, weight, 0.0).detach(), over)
