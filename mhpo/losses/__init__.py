"""MHPO and the GRPO family as one registry of losses.

    from mhpo.losses import get_loss, LOSSES
    out = get_loss("mhpo")(logp, old_logp, advantages, mask, agg="seq-mean-token-mean", **hparams)
    out.loss   # scalar, differentiable w.r.t. logp
    out.stats  # detached tensors for mhpo.diagnostics

One module per loss registers itself with `register_loss`; `aggregate` is the single
aggregation function.
"""

# Importing a loss module registers it; this order is the order of LOSSES.
from mhpo.losses import mhpo, grpo, dapo, dual_clip, gspo, sapo, cispo  # noqa: F401, I001
from mhpo.losses._registry import LOSSES, LossOutput, PolicyLoss, TokenInputs, get_loss, register_loss
from mhpo.losses.aggregation import AGGREGATIONS, agg_units, aggregate

__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "LossOutput",
    "PolicyLoss",
    "TokenInputs",
    "agg_units",
    "aggregate",
    "get_loss",
    "register_loss",
]
