"""Registry losses as verl policy losses: `import mhpo.integrations.verl`, then
`actor_rollout_ref.actor.policy_loss.loss_mode=mhpo`.

Importing this module registers, through verl's own `register_policy_loss`, "mhpo" and every
other registry loss as "mhpo_<name>" ("mhpo_grpo", "mhpo_dapo", "mhpo_dual_clip",
"mhpo_gspo", "mhpo_sapo", "mhpo_cispo"), names that do not clash with verl's. Each has
verl's signature `(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (pg_loss, pg_metrics)`; the per-token loss is the registry's, the
rollout importance weights multiply it, and verl's `agg_loss` aggregates it with the actor's
`global_batch_info`, so the global-batch normalisation is verl's. Hyper-parameters come
from the actor config: `clip_ratio` (grpo, dual_clip `eps`), `clip_ratio_low/high` (dapo,
gspo, cispo), `clip_ratio_c` (dual_clip `clip_c`), `tau_pos/tau_neg` (sapo); others (mhpo's
c, k_pos, ...) from the JSON object in the environment variable MHPO_LOSS_HPARAMS (set it
in the Ray runtime environment so every worker sees it), which also overrides the above.

Streaming: with MHPO_PROJECT set (and MHPO_SERVER / MHPO_TOKEN as for `mhpo.init`;
MHPO_RUN_NAME names the run), every rank accumulates the diagnostics of its micro-batches
and, once it has seen `global_batch_size / dp_size` sequences (one optimizer step), they are
reduced across ranks and rank 0 sends one record. Tested with verl 0.9.1.

Sampler vs trainer: verl hands a policy loss the rollout log-probs only as `rollout_is_weights`
(when `algorithm.rollout_correction.rollout_is` is on): w = exp(old_log_prob - rollout_log_prob),
truncated at `rollout_is_threshold` (TIS) or zeroed outside a band (IcePop). With the token-level
weights (`rollout_is="token"`, no batch normalisation) each weight strictly between 0 and the
threshold (MHPO_ROLLOUT_IS_THRESHOLD, verl's default 2.0) gives that token's rollout log-prob
back exactly, log w = old - rollout, and the record gets the `mismatch/*` statistics; a truncated
or zeroed token's is unknown and counts in `mismatch/unscored_frac`. verl's own `rollout_corr/*`
metrics (its logger, through the MLflow endpoint) cover every token.

Each record carries the log-prob/advantage covariance (`policy/cov_logp_adv`, `policy/corr_logp_adv`)
of the diagnostics, but no grad-norm: verl computes it in its engine's `optimizer_step`
(`clip_grad_norm_` at `config.optim.clip_grad`, returning the norm before clipping) after the
policy loss, this module's only hook, has returned, and reports it only to its own logger as
`actor/grad_norm`. The threshold reaches the policy loss, the norm does not, so there is no
`grad/norm_after_clip` here; through the MLflow endpoint, verl's `actor/grad_norm` and
`response_length/clip_ratio` become `grad/norm` and `policy/truncated_frac`.

verl's policy loss does not see where its optimizer step sits in the rollout; with
MHPO_UPDATES_PER_ROLLOUT set (= train_batch_size / ppo_mini_batch_size x ppo_epochs) each
record also carries `train/rollout` and `train/update_index` (0 = the first, on-policy
update), so the service compares like with like. Without it the service takes a step whose
log-ratio is exactly 0 as on-policy, which verl's recomputed old log-probabilities need not give.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

import mhpo.client
from mhpo.diagnostics import DiagnosticsAccumulator
from mhpo.losses import LOSSES, get_loss
from mhpo.losses._registry import prepare

HPARAMS_ENV = "MHPO_LOSS_HPARAMS"
UPDATES_ENV = "MHPO_UPDATES_PER_ROLLOUT"
THRESHOLD_ENV = "MHPO_ROLLOUT_IS_THRESHOLD"
VERL_NAMES: dict[str, str] = {("mhpo" if name == "mhpo" else f"mhpo_{name}"): name for name in LOSSES}


def _field(config: Any, key: str) -> Any:
    return None if config is None else (config.get(key) if hasattr(config, "get") else getattr(config, key, None))


def hparams_from(name: str, config: Any) -> dict[str, float | None]:
    """The registry hyper-parameters of loss `name` read from verl's actor `config` and MHPO_LOSS_HPARAMS."""
    clip = _field(config, "clip_ratio")
    low = _field(config, "clip_ratio_low")
    high = _field(config, "clip_ratio_high")
    low, high = (low if low is not None else clip), (high if high is not None else clip)
    from_config: dict[str, Any] = {
        "grpo": {"eps": clip},
        "dapo": {"eps_low": low, "eps_high": high},
        "gspo": {"eps_low": low, "eps_high": high},
        "cispo": {"eps_low": low, "eps_high": high},
        "dual_clip": {"eps": clip, "clip_c": _field(config, "clip_ratio_c")},
        "sapo": {"tau_pos": _field(config, "tau_pos"), "tau_neg": _field(config, "tau_neg")},
    }.get(name, {})
    hp = {k: float(v) for k, v in from_config.items() if v is not None}
    raw = os.environ.get(HPARAMS_ENV)
    if raw:
        try:
            extra = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{HPARAMS_ENV}={raw!r} is not JSON ({e}); set it to an object like '{{\"c\": 1.5}}'"
            ) from None
        if not isinstance(extra, dict):
            raise ValueError(f"{HPARAMS_ENV}={raw!r} must be a JSON object of hyper-parameters")
        hp |= extra
    return get_loss(name).resolve(**hp)


class _Stream:
    """Per-process accumulation of one optimizer step's micro-batches; rank 0 sends the record."""

    def __init__(self) -> None:
        self.acc: DiagnosticsAccumulator | None = None
        self.loss: str | None = None
        self.sequences = 0
        self.step = 0
        self.run: mhpo.client.Run | None = None

    @property
    def enabled(self) -> bool:
        return bool(os.environ.get("MHPO_PROJECT"))

    def update(
        self,
        name: str,
        hp: dict[str, float | None],
        inputs: tuple[Tensor, ...],
        config: Any,
        stats: dict[str, Tensor],
        rollout_is_weights: Tensor | None = None,
    ) -> None:
        log_prob, old_log_prob, advantages, mask = inputs
        if self.acc is None:
            self.acc, self.loss = DiagnosticsAccumulator(name, hp), name
        rollout = None if rollout_is_weights is None else rollout_log_probs(old_log_prob, rollout_is_weights)
        self.acc.update(log_prob.detach(), old_log_prob, advantages, mask, loss_stats=stats, rollout_logp=rollout)
        self.sequences += log_prob.shape[0]
        info = _field(config, "global_batch_info") or {}
        per_rank = (info.get("global_batch_size") or 0) / max(int(info.get("dp_size") or 1), 1)
        if self.sequences >= per_rank:
            self.flush()

    def flush(self) -> None:
        if self.acc is None or self.sequences == 0:
            return
        stats = self.acc.compute()
        self.sequences = 0
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0:
            if self.run is None:
                self.run = mhpo.client.init(
                    os.environ["MHPO_PROJECT"], os.environ.get("MHPO_RUN_NAME", "verl"), loss=self.loss
                )
            self.run.log(
                self.step,
                scalars={**stats.scalars, **self.position()},
                histograms=stats.histograms,
                outliers=[dict(o) for o in stats.outliers],
            )
        self.step += 1

    def position(self) -> dict[str, float]:
        """`train/rollout` and `train/update_index` of this optimizer step, from MHPO_UPDATES_PER_ROLLOUT."""
        raw = os.environ.get(UPDATES_ENV)
        if not raw:
            return {}
        try:
            updates = int(raw)
            if updates < 1:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{UPDATES_ENV}={raw!r} must be a whole number >= 1: train_batch_size / "
                "ppo_mini_batch_size x ppo_epochs, the optimizer steps of one rollout"
            ) from None
        return {"train/rollout": float(self.step // updates), "train/update_index": float(self.step % updates)}


STREAM = _Stream()


def rollout_log_probs(old_log_prob: Tensor, rollout_is_weights: Tensor) -> Tensor:
    """The rollout log-probs behind verl's token-level IS weights: old - log w where 0 < w < threshold,
    NaN (unscored) where the weight was truncated or zeroed (see the module docstring)."""
    raw = os.environ.get(THRESHOLD_ENV, "2.0")
    try:
        threshold = float(raw)
    except ValueError:
        raise ValueError(f"{THRESHOLD_ENV}={raw!r} must be a number: verl's rollout_is_threshold (upper)") from None
    w = rollout_is_weights.detach().double()
    known = (w > 0) & (w < threshold)
    return torch.where(known, old_log_prob.detach().double() - torch.log(torch.where(known, w, 1.0)), math.nan)


def make_policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """verl's policy-loss function for the registry loss `name`."""
    loss = get_loss(name)

    def policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        hp = hparams_from(name, config)
        inputs = prepare(log_prob, old_log_prob, advantages, response_mask)
        per_token, stats = loss.token_loss(inputs, hp)
        if rollout_is_weights is not None:
            per_token = per_token * rollout_is_weights
        batch_info = dict(_field(config, "global_batch_info") or {})
        pg_loss = agg_loss(
            loss_mat=per_token, loss_mask=inputs.mask.to(per_token.dtype), loss_agg_mode=loss_agg_mode, **batch_info
        )
        stats["loss"] = pg_loss.detach()
        valid = inputs.mask
        count = valid.sum().clamp(min=1).double()
        bounds = loss.clip_bounds(**hp)
        low = high = torch.zeros_like(valid)
        if bounds is not None:
            low = (inputs.x < bounds[0]) & (inputs.adv < 0) & valid
            high = (inputs.x > bounds[1]) & (inputs.adv > 0) & valid
        metrics = {
            "actor/pg_clipfrac": ((low | high).sum() / count).item(),
            "actor/ppo_kl": (-(inputs.x * valid).sum() / count).item(),
            "actor/pg_clipfrac_lower": (low.sum() / count).item(),
        }
        if STREAM.enabled:
            tensors = (log_prob, old_log_prob, advantages, response_mask)
            STREAM.update(name, hp, tensors, config, stats, rollout_is_weights)
        return pg_loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{name}"
    policy_loss.__doc__ = f"verl policy loss from MHPO Monitor's registry loss {name!r} (see mhpo.integrations.verl)."
    return policy_loss


for _verl_name, _name in VERL_NAMES.items():
    register_policy_loss(_verl_name)(make_policy_loss(_name))
