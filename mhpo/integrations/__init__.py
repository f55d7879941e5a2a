"""Integrations with the trainers people already use: `mhpo.integrations.trl` (a drop-in
`trl.GRPOTrainer`), `mhpo.integrations.verl` (registry losses for verl's `policy_loss`), and
`METRIC_NAMES`, the mapping of TRL / verl / transformers metric names to the product's keys
(used by the TRL subclass and by the server's MLflow-compatible endpoint)."""

from mhpo.integrations.names import METRIC_NAMES, product_key, product_scalars

__all__ = ["METRIC_NAMES", "product_key", "product_scalars"]
