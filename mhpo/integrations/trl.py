"""A drop-in `trl.GRPOTrainer` that streams MHPO Monitor's diagnostics and can train with a registry loss.

    from mhpo.integrations.trl import GRPOTrainer        # instead of `from trl import GRPOTrainer`
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                          mhpo_project="my-project")       # + loss="mhpo", loss_hparams={...} to change the loss
    trainer.train()

Per optimizer step, in train mode only, it streams every diagnostic of `mhpo.diagnostics`
(scalars, the six histograms, the outlier tokens decoded), computed from the very tensors
TRL's `_compute_loss` uses (log-probs, old log-probs, advantages, completion mask times tool
mask, entropies), with TRL's own logged metrics (their product names added, see
`mhpo.integrations.names`: `completions/clipped_ratio` as `policy/truncated_frac`,
`frac_reward_zero_std` as `group/degenerate_frac`, `grad_norm`, the norm before clipping, as
`grad/norm`), `grad/norm_after_clip` (what clipping at `max_grad_norm` left of `grad_norm`) and
`train/update_index` (0 for the first, on-policy update of a generation batch; `num_iterations`
and `steps_per_generation` make later ones off-policy).
The statistics are reduced across processes; the main process alone sends them. When TRL samples
with vLLM, its per-token sampling log-probs (`sampling_per_token_logps` in the inputs, NaN where
vLLM gave none) add the sampler-vs-trainer statistics (`mismatch/*`, against `old_per_token_logps`).

With `loss=None` TRL's own loss runs untouched. With a registry loss only the policy term is
replaced: TRL's off-policy mask, entropy mask, tool mask, vLLM importance-sampling correction,
KL/beta term, static entropy bonus, MoE aux loss and division for gradient accumulation stay.
The registry aggregation picks TRL's normaliser: "token-mean" divides by the tokens of the
whole accumulation window (TRL's `dapo` / `cispo`), "seq-mean-token-mean" and
"seq-mean-token-sum-norm" (divisor `max_completion_length`) divide each micro-batch's value by
the accumulation steps (TRL's `grpo` / `dr_grpo`). Conventions that differ from TRL's:
CISPO's upper bound is `1 + eps_high` here and `epsilon_high` in TRL; a sequence without a
valid token is left out of "seq-mean-token-mean" here and counts as 0 in TRL's `grpo`.
Resuming continues the same monitoring run: each checkpoint folder gets `mhpo_run.json` (the
run's project, name and id), and `train(resume_from_checkpoint=...)` (a path, or True for the
latest checkpoint in `output_dir`) reopens that run rewound to the checkpoint's `global_step`, so
the steps logged after the checkpoint are replaced by the resumed trajectory. A run passed as
`mhpo_run` is used as it is.
Tested with TRL 1.16 (the `trl` extra pins the supported range).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
import trl
from torch import Tensor
from transformers.trainer_utils import get_last_checkpoint

import mhpo.client
from mhpo.diagnostics import DiagnosticsAccumulator, grad_norm_after_clip
from mhpo.integrations.names import product_scalars
from mhpo.losses import aggregate, get_loss
from mhpo.losses._registry import prepare

logger = logging.getLogger(__name__)

RUN_FILE = "mhpo_run.json"


def diagnostics_loss(args: Any) -> tuple[str, dict[str, float | None]]:
    """The registry loss (and hyper-parameters) whose clip window and multiplier describe TRL's own `loss_type`."""
    eps_low = float(args.epsilon)
    eps_high = float(args.epsilon_high if args.epsilon_high is not None else args.epsilon)
    if args.importance_sampling_level == "sequence":
        return "gspo", {"eps_low": eps_low, "eps_high": eps_high}
    if args.loss_type == "cispo":
        return "cispo", {"eps_high": eps_high - 1.0, "eps_low": None}
    if args.loss_type == "sapo":
        return "sapo", {"tau_pos": float(args.sapo_temperature_pos), "tau_neg": float(args.sapo_temperature_neg)}
    if eps_low == eps_high:
        return "grpo", {"eps": eps_low}
    return "dapo", {"eps_low": eps_low, "eps_high": eps_high}


def default_run_name(args: Any, loss: str | None) -> str:
    """`args.run_name` when set, else the run is named by its loss: `trl-<registry loss>`, or
    `trl-<loss_type>` for TRL's own loss, so runs of different objectives tell apart in the dashboard."""
    return args.run_name or f"trl-{loss or args.loss_type}"


class GRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` plus MHPO Monitor streaming and an optional registry loss (module docstring).

    Extra keyword arguments: `loss` (a name in `mhpo.losses.LOSSES`, None = TRL's own),
    `loss_hparams`, `agg` (default: the loss's own aggregation), `mhpo_project`, `mhpo_run_name`
    (default: `args.run_name`, else `trl-<loss>`), `mhpo_server` / `mhpo_token` (default: MHPO_SERVER / MHPO_TOKEN),
    `mhpo_run` (an open `mhpo.client.Run` to log into instead), `stream` (False: train only),
    `top_k_outliers`.
    """

    # What TRL sets in `__init__`, typed as used here (the base classes declare the wider types).
    args: trl.GRPOConfig
    model: torch.nn.Module
    _run_options: dict[str, Any]

    def __init__(
        self,
        *args: Any,
        loss: str | None = None,
        loss_hparams: Mapping[str, float | None] | None = None,
        agg: str | None = None,
        mhpo_project: str = "trl",
        mhpo_run_name: str | None = None,
        mhpo_server: str | None = None,
        mhpo_token: str | None = None,
        mhpo_run: mhpo.client.Run | None = None,
        stream: bool = True,
        top_k_outliers: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.mhpo_loss = None if loss is None else get_loss(loss)
        if self.mhpo_loss is not None:
            self.mhpo_hparams = self.mhpo_loss.resolve(**dict(loss_hparams or {}))
            self.mhpo_agg = agg or self.mhpo_loss.default_agg
            aggregate(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), self.mhpo_agg)  # names a bad agg now
            if self.importance_sampling_level != "token" and loss != "gspo":
                raise ValueError(
                    f"importance_sampling_level={self.importance_sampling_level!r} with loss={loss!r}: a registry "
                    "loss gets token log-ratios; use importance_sampling_level='token' (or loss='gspo')"
                )
            if self.use_adaptive_entropy:
                raise ValueError("use_adaptive_entropy=True is not supported with a registry loss; set loss=None")
            diag_name, diag_hp = self.mhpo_loss.name, self.mhpo_hparams
        else:
            if loss_hparams or agg:
                raise ValueError("loss_hparams and agg need a registry loss: pass loss='mhpo' (or another name)")
            diag_name, diag_hp = diagnostics_loss(self.args)
        self._acc = DiagnosticsAccumulator(diag_name, diag_hp, top_k=top_k_outliers)
        self._stream = stream
        self._run = mhpo_run
        self._own_run = mhpo_run is None
        self._run_options = {
            "project": mhpo_project,
            "name": mhpo_run_name or default_run_name(self.args, loss),
            "server": mhpo_server,
            "token": mhpo_token,
            "loss": loss or diag_name,
        }
        self._resume: dict[str, Any] = {}
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._capture: list[tuple[Tensor, Tensor | None]] | None = None

    # ------------------------------------------------------------------ streaming
    @property
    def mhpo_run(self) -> mhpo.client.Run | None:
        """The run the main process streams into (created on the first record)."""
        if self._run is None and self._stream and self.accelerator.is_main_process:
            config = {**self.args.to_sanitized_dict(), "mhpo_loss": self._run_options["loss"]}
            if self.mhpo_loss is not None:
                config |= {"mhpo_hparams": dict(self.mhpo_hparams), "mhpo_agg": self.mhpo_agg}
            self._run = mhpo.client.init(
                self._resume.get("project", self._run_options["project"]),
                self._resume.get("name", self._run_options["name"]),
                config=config,
                loss=self._run_options["loss"],
                server=self._run_options["server"],
                token=self._run_options["token"],
                run_id=self._resume.get("run_id"),
                resume_from_step=self._resume.get("step"),
            )
            self._resume = {}
        return self._run

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """transformers' checkpoint, plus the run's identity so that a resume continues this run.

        Written once the run holds every step up to the checkpoint's (on the server, or in the
        client's spool), so a process killed after it and resumed from it leaves no hole.
        """
        self._flush_pending()
        if self._run is not None and not self._run.persist():
            logger.warning(
                "checkpoint at step %d: the run's records were not sent or spooled within %gs; "
                "a resume from it may miss the latest steps",
                self.state.global_step,
                mhpo.client.DEFAULT_PERSIST_TIMEOUT,
            )
        super()._save_checkpoint(model, trial)
        if self._run is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, RUN_FILE), "w") as f:
                json.dump({"project": self._run.project, "name": self._run.name, "run_id": self._run.id}, f)

    def _resume_run_from(self, checkpoint: str | bool | None) -> None:
        """Remember the run saved with `checkpoint` and its step, for the run opened on the first record."""
        if isinstance(checkpoint, bool):  # True: transformers' choice (no folder: its own error follows)
            latest = checkpoint and self.args.output_dir is not None and os.path.isdir(self.args.output_dir)
            checkpoint = get_last_checkpoint(self.args.output_dir) if latest else None
        if checkpoint is None or not self._own_run or self._run is not None:
            return
        saved = os.path.join(checkpoint, RUN_FILE)
        if not os.path.isfile(saved):
            logger.info("%s has no %s: the resumed training logs into a new run", checkpoint, RUN_FILE)
            return
        with open(saved) as f:
            run = json.load(f)
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            step = int(json.load(f)["global_step"])
        self._resume = {"project": run["project"], "name": run["name"], "run_id": run["run_id"], "step": step}

    def _send(self, step: int, record: dict[str, Any]) -> None:
        run = self.mhpo_run
        if run is not None:
            run.log(
                step,
                scalars=record["scalars"],
                histograms=record["histograms"],
                outliers=record["outliers"],
                time=record["time"],
            )

    def _flush_pending(self) -> None:
        if self._pending is not None:
            self._send(*self._pending)
            self._pending = None

    def _step_statistics(self) -> None:
        """At the last micro-batch of an optimizer step: reduce (every process), keep for `log`."""
        stats = self._acc.compute()
        outliers = [dict(o) for o in stats.outliers]
        decode = getattr(self.processing_class, "decode", None)  # a tokenizer or a processor
        for o in outliers:
            if decode is not None and not o.get("text") and o.get("token_id") is not None:
                o["text"] = decode([int(o["token_id"])])
        steps_per_generation = self.args.steps_per_generation
        assert steps_per_generation is not None  # GRPOConfig.__post_init__ fills it in
        per_generation = steps_per_generation * self.num_iterations
        scalars = {
            **stats.scalars,
            "train/update_index": float((self._step % per_generation) // self.current_gradient_accumulation_steps),
        }
        self._flush_pending()
        record = {"time": time.time(), "scalars": scalars, "histograms": stats.histograms, "outliers": outliers}
        self._pending = (self.state.global_step + 1, record)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's logging, then (train mode) its metrics join the step's diagnostics in one record."""
        train = self.model.training
        super().log(logs, start_time)
        if not train or not self._stream:
            return
        numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "grad_norm" in numbers:  # transformers logs the norm clip_grad_norm_ returned: before clipping
            numbers["grad/norm_after_clip"] = grad_norm_after_clip(numbers["grad_norm"], self.args.max_grad_norm)
        step = self.state.global_step
        if self._pending is not None and self._pending[0] == step:
            record = self._pending[1]
            self._pending = None
        else:
            self._flush_pending()
            record = {"time": time.time(), "scalars": {}, "histograms": {}, "outliers": []}
        record["scalars"] = product_scalars({**numbers, **record["scalars"]})
        self._send(step, record)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """TRL's training (resumed: into the checkpoint's run, rewound to its step); then the last step is
        sent and a run this trainer opened is finished."""
        self._resume_run_from(resume_from_checkpoint)
        status = "failed"
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)
            status = "finished"
            return out
        finally:
            self._flush_pending()
            if self._run is not None and self._own_run:
                self._run.finish(status=status)
                self._run = None

    # ------------------------------------------------------------------ the loss
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capture is not None:
            self._capture.append((out[0], out[1]))
        return out

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        self._capture = []
        try:
            if self.mhpo_loss is None:
                loss = super()._compute_loss(model, inputs)
                logps, entropies = self._capture[0]
                stats = None
            else:
                loss, logps, entropies, stats = self._registry_loss(model, inputs)
        finally:
            self._capture = None
        if self.model.training and self._stream:
            mask = (
                inputs["completion_mask"]
                if "tool_mask" not in inputs
                else inputs["completion_mask"] * inputs["tool_mask"]
            )
            old = inputs.get("old_per_token_logps")
            self._acc.update(
                logps.detach(),
                logps.detach() if old is None else old,
                inputs["advantages"],
                mask,
                loss_stats=stats,
                entropy=None if entropies is None else entropies.detach(),
                token_ids=inputs["completion_ids"],
                rollout_logp=inputs.get("sampling_per_token_logps"),
            )
            if self.accelerator.sync_gradients:
                self._step_statistics()
        return loss

    def _registry_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """TRL's `_compute_loss` with the registry loss as the policy term (see the module docstring)."""
        assert self.mhpo_loss is not None  # called only when a registry loss was given
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{
                k: inputs.get(k)
                for k in (
                    "pixel_values",
                    "image_grid_thw",
                    "num_images",
                    "pixel_attention_mask",
                    "spatial_shapes",
                    "num_tiles",
                    "image_sizes",
                    "token_type_ids",
                    "mm_token_type_ids",
                    "image_position_ids",
                )
            },
        )
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        advantages = inputs["advantages"]
        adv_2d = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        token_inputs = prepare(logps, old, advantages, mask)
        per_token_loss, stats = self.mhpo_loss.token_loss(token_inputs, self.mhpo_hparams)
        if self.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * self.get_off_policy_mask(
                advantages=adv_2d,
                per_token_logps=logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
        if entropy_mask is not None:
            per_token_loss = per_token_loss * entropy_mask
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        per_token_kl = None
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(logps - old)
            per_token_loss = per_token_loss + self.beta * per_token_kl

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        valid = token_inputs.mask
        if self.mhpo_agg == "token-mean":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            loss = torch.where(valid, per_token_loss, 0.0).sum() / normalizer
        else:
            max_len = self.max_completion_length if self.mhpo_agg == "seq-mean-token-sum-norm" else None
            loss = aggregate(per_token_loss, valid, self.mhpo_agg, max_len=max_len) / accumulation
        stats["loss"] = loss.detach() * accumulation
        if self._entropy_bonus_enabled:
            effective = mask if entropy_mask is None else mask * entropy_mask
            loss = (
                loss - self.entropy_coef * (entropies * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
            )
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        def global_masked_mean(x: Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if per_token_kl is not None:
            self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropies))
        bounds = self.mhpo_loss.clip_bounds(**self.mhpo_hparams)
        if bounds is not None:
            x = token_inputs.x
            low = ((x < bounds[0]) & (adv_2d < 0)).float()
            high = ((x > bounds[1]) & (adv_2d > 0)).float()
            self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
            self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        return loss, logps, entropies, stats
