"""TRL, verl and transformers metric names -> the product's scalar keys.

Flags, alerts and dashboard panels read the product's keys (`policy/entropy`, `grad/norm`...);
a run logged by TRL or verl (directly, through the MLflow-compatible endpoint or by `mhpo import`)
gets those keys too, next to its original names, which are always kept. transformers' TensorBoard
callback writes the Trainer's logs with a `train/` prefix (`train/entropy`): the prefixed name maps
as the bare one.
"""

from __future__ import annotations

from collections.abc import Mapping

METRIC_NAMES: dict[str, str] = {
    # TRL GRPOTrainer (and transformers' Trainer)
    "loss": "train/loss",
    "grad_norm": "grad/norm",  # before clipping: what clip_grad_norm_ returns
    "learning_rate": "train/lr",
    "entropy": "policy/entropy",
    "kl": "policy/kl_ref",
    "reward": "reward/mean",
    "reward_std": "reward/std",
    "completions/mean_length": "policy/length_mean",
    "frac_reward_zero_std": "group/degenerate_frac",
    "clip_ratio/low_mean": "ratio/clip_frac_low",
    "clip_ratio/high_mean": "ratio/clip_frac_high",
    "clip_ratio/region_mean": "ratio/clip_frac",
    # TRL sampling with vLLM (`vllm_importance_sampling_correction`): |old - sampling| log-prob gap, and the IS
    # ratio exp(old - sampling) after TRL's truncation or masking (token or sequence level, per its mode)
    "sampling/sampling_logp_difference/mean": "mismatch/abs_mean",
    "sampling/sampling_logp_difference/max": "mismatch/abs_max",
    "sampling/importance_sampling_ratio/min": "mismatch/is_min",
    "sampling/importance_sampling_ratio/mean": "mismatch/is_mean",
    "sampling/importance_sampling_ratio/max": "mismatch/is_max",
    "completions/clipped_ratio": "policy/truncated_frac",
    # verl
    "actor/entropy": "policy/entropy",
    "actor/pg_loss": "train/loss",
    "actor/pg_clipfrac": "ratio/clip_frac",
    "actor/ppo_kl": "policy/kl_k1",
    "actor/kl_loss": "policy/kl_ref",
    "actor/grad_norm": "grad/norm",  # before clipping, as TRL's
    "actor/lr": "train/lr",
    "critic/score/mean": "reward/mean",
    "response_length/mean": "policy/length_mean",
    # verl rollout correction (`rollout_corr_helper.py`): kl = mean(rollout - old) = -mean(d); k3_kl and
    # chi2_token as here; the rollout_is_* statistics are of the applied (truncated) IS weights
    "rollout_corr/kl": "mismatch/kl_k1",
    "rollout_corr/k3_kl": "mismatch/kl_k3",
    "rollout_corr/chi2_token": "mismatch/chi2",
    "rollout_corr/rollout_is_mean": "mismatch/is_mean",
    "rollout_corr/rollout_is_min": "mismatch/is_min",
    "rollout_corr/rollout_is_max": "mismatch/is_max",
    "rollout_corr/rollout_is_std": "mismatch/is_std",
    "rollout_corr/rollout_is_eff_sample_size": "mismatch/ess",
    # verl's debug metrics: despite the name, |exp(old) - exp(rollout)|, a gap in probability
    "training/rollout_probs_diff_mean": "mismatch/prob_abs_mean",
    "training/rollout_probs_diff_max": "mismatch/prob_abs_max",
    "response_length/clip_ratio": "policy/truncated_frac",
}
# The prefix transformers' TensorBoardCallback puts before the Trainer's log keys.
TRAINER_PREFIX = "train/"


def product_key(name: str) -> str | None:
    """The product's key for a framework's metric name (bare or `train/`-prefixed), or None."""
    key = METRIC_NAMES.get(name)
    if key is None and name.startswith(TRAINER_PREFIX):
        key = METRIC_NAMES.get(name[len(TRAINER_PREFIX) :])
    return key


def product_scalars(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` with the product's key added next to every mapped name (the original kept).

    A product key the metrics already hold (for example from the diagnostics) is not overwritten."""
    out = dict(metrics)
    for name, value in metrics.items():
        key = product_key(name)
        if key is not None and key not in metrics:
            out[key] = value
    return out
