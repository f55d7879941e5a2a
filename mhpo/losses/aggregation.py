"""The one aggregation function: per-token losses (B, T) -> scalar.

- "seq-mean-token-mean": mean over sequences of each sequence's token mean (GRPO paper,
  MHPO paper); sequences without a valid token are left out of the mean.
- "token-mean": mean over all valid tokens of the batch (DAPO).
- "seq-mean-token-sum-norm": each sequence's token sum divided by a constant `max_len`,
  averaged over the B sequences (Dr. GRPO; TRL's `loss_type="dr_grpo"`). Pass the
  configured maximum completion length as `max_len` so the divisor stays constant
  across batches; it defaults to T.
Masked tokens contribute nothing, even if their per-token loss is inf or NaN.

Under gradient accumulation, a mini-batch split into micro-batches gets the mini-batch's
loss and gradient back by weighting each micro-batch's aggregate with `agg_units`: its
share of the units the aggregation divides by (valid tokens, non-empty sequences or
sequences), the way TRL and verl divide by the whole batch's token count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhpo.loss_specs import AGGREGATIONS

__all__ = ["AGGREGATIONS", "agg_units", "aggregate"]


def aggregate(per_token: Tensor, mask: Tensor, agg: str, *, max_len: int | None = None) -> Tensor:
    """Reduce `per_token` (B, T) over the bool `mask` (B, T) to a scalar, without a host sync."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation agg={agg!r}; valid: {', '.join(AGGREGATIONS)}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0):
        raise ValueError(f"max_len={max_len!r} must be a positive int (the constant max completion length)")
    if max_len is not None and agg != "seq-mean-token-sum-norm":
        raise ValueError(f"max_len is only used by agg='seq-mean-token-sum-norm', got agg={agg!r}; drop max_len")
    values = torch.where(mask, per_token, 0.0)
    if agg == "token-mean":
        return values.sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        tokens = mask.sum(dim=-1)
        seq = values.sum(dim=-1) / tokens.clamp(min=1)
        return seq.sum() / (tokens > 0).sum().clamp(min=1)
    divisor = mask.shape[-1] if max_len is None else max_len
    return values.sum() / (mask.shape[0] * divisor)


def agg_units(mask: Tensor, agg: str) -> Tensor:
    """What `aggregate(..., agg)` divides by on this `mask` (B, T): valid tokens ("token-mean"),
    sequences with a valid token ("seq-mean-token-mean") or sequences ("seq-mean-token-sum-norm").

    `aggregate(mb) * agg_units(mb) / sum of agg_units over the micro-batches`, summed over the
    micro-batches, equals `aggregate` of the whole mini-batch (loss and gradient).
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation agg={agg!r}; valid: {', '.join(AGGREGATIONS)}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    if agg == "token-mean":
        return valid.sum()
    if agg == "seq-mean-token-mean":
        return valid.any(dim=-1).sum()
    return torch.tensor(valid.shape[0], device=valid.device)
