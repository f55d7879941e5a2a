"""The instrumented GRPO-family trainer: `Trainer(config).train()`.

One `step()` = one rollout (prompts x G completions, rewards, group-relative advantages,
`old_logp` from the generating weights) followed by `ppo_epochs * mini_batches` optimizer
steps, each streamed as one record: the loss's diagnostics from
`mhpo.diagnostics`, grad-norms (total and per parameter group), the update/weight ratio,
rewards and group statistics, lr, loss, and whether the step was skipped because its loss
or grad-norm was not finite. The first mini-batch of a rollout is on-policy (x = 0); later
ones see the ratio move, which is what the diagnostics are for. The sampler's log-prob of each
sampled token is recorded during generation, so every record also carries the sampler-vs-trainer
statistics (`mismatch/*`, d = old_logp - rollout_logp), and `--is-correction` can reweight the
policy loss by them (`mhpo.trainer.correction`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import mhpo.client
from mhpo.diagnostics import HISTOGRAMS, DiagnosticsAccumulator, grad_norm_after_clip
from mhpo.losses import agg_units, get_loss
from mhpo.trainer import distributed
from mhpo.trainer.checkpoint import CONFIG_FILE, STATE_FILE, checkpoint_path
from mhpo.trainer.config import TrainerConfig
from mhpo.trainer.correction import correction_weights
from mhpo.trainer.rollout import Generation, TransformersRollout, VLLMRollout, token_logp
from mhpo.trainer.tasks import make_task
from mhpo.trainer.tiny import tiny_model_path

logger = logging.getLogger(__name__)

PARAM_GROUPS = ("embeddings", "attention", "mlp", "norm", "head", "other")


def quiet_libraries() -> None:
    """`--no-progress` means no bar at all: transformers' and huggingface_hub's own bars (loading and
    saving weights) and their warnings are turned off too, for this process."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def param_group(name: str) -> str:
    """Parameter group of a parameter name, for `grad/norm/<group>` (Llama, Qwen, GPT-2 naming)."""
    n = name.lower()
    if "lm_head" in n:
        return "head"
    if "embed" in n or "wte" in n or "wpe" in n:
        return "embeddings"
    if "norm" in n or ".ln_" in n or n.startswith("ln_"):
        return "norm"
    if "attn" in n or "attention" in n:
        return "attention"
    if "mlp" in n or "ffn" in n or "feed_forward" in n:
        return "mlp"
    return "other"


def group_advantages(rewards: Tensor, group_size: int, kind: str) -> Tensor:
    """(N,) rewards in groups of G -> (N,) advantages: r - mean (drgrpo), divided by std + 1e-4 (grpo)."""
    grouped = rewards.view(-1, group_size)  # (P, G)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if kind == "grpo":
        adv = adv / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """A GRPO-family trainer on a `transformers` causal LM; see the module docstring.

    `run` (a `mhpo.client.Run`) is created from the config when streaming is on and this is
    rank 0; pass one to reuse it. `Trainer.step()` returns the records it produced (on every
    rank; the scalars and histograms are already reduced across ranks).
    """

    def __init__(self, config: TrainerConfig, run: Any | None = None) -> None:
        config.validate()
        self.cfg = cfg = config
        if not cfg.progress:
            quiet_libraries()
        self.dist = distributed.setup(cfg.device)
        self.device = self.dist.device
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.task = make_task(cfg.task, cfg.data, cfg.reward, cfg.reward_pattern, cfg.task_digits)
        self.loss_fn = get_loss(cfg.loss)
        self.hparams = dict(cfg.hparams)
        self.loss_fn.resolve(**self.hparams)  # fail now, not after the first rollout

        self.base_path = self._base_model_path()
        resume_path = self._resume_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = getattr(torch, cfg.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(resume_path or self.base_path, dtype=dtype)
        # transformers types PreTrainedModel.to through functools.wraps, which mypy reads as unbound
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # eval: no dropout, one function for old_logp and logp
        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=dtype)
            self.ref_model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]  # as above
        self.ddp: Any = DistributedDataParallel(self.model) if self.dist.enabled else self.model

        self.lr = cfg.lr if cfg.lr is not None else (5e-4 if cfg.model == "tiny" else 1e-6)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.groups = [param_group(n) for n in self.names]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=cfg.weight_decay)
        warm = max(cfg.lr_warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )

        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = self.tokenizer.pad_token_id
        if cfg.rollout == "vllm":
            self.engine: Any = VLLMRollout(
                str(resume_path or self.base_path),
                pad,
                self.eos_ids,
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.seed + self.dist.rank,
                cfg.vllm_gpu_memory_utilization,
                cfg.dtype if cfg.rollout_dtype == "same" else cfg.rollout_dtype,
                cfg.top_k,
                cfg.top_p,
            )
        else:
            rollout_dtype = dtype if cfg.rollout_dtype == "same" else getattr(torch, cfg.rollout_dtype)
            self.engine = TransformersRollout(
                pad,
                self.eos_ids,
                cfg.max_new_tokens,
                cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                dtype=rollout_dtype,
                separate=rollout_dtype != dtype or cfg.rollout_sync_every > 1,
            )

        self.data_rng = random.Random(cfg.seed * 1_000_003 + self.dist.rank)
        torch.manual_seed(cfg.seed * 1_000_003 + self.dist.rank)
        self.rollout_step = 0
        self.opt_step = 0
        self.skipped = 0
        self.reward_history: list[float] = []  # reward/mean of each rollout this process ran
        run_id = None
        if resume_path is not None:
            run_id = self._load_state(resume_path)

        self.run = run
        if self.run is None and cfg.stream and self.dist.is_main:
            # Resuming: the run's history is rewound to the checkpoint's last optimizer step, so the
            # steps logged after the checkpoint by the interrupted process give way to the new ones.
            self.run = mhpo.client.init(
                cfg.project,
                cfg.run_name,
                config=cfg.to_dict(),
                loss=cfg.loss,
                server=cfg.server,
                token=cfg.token,
                run_id=run_id,
                resume_from_step=self.opt_step - 1 if run_id is not None else None,
            )
        self.run_url: str | None = self.run.url if self.run is not None else None

    # ------------------------------------------------------------------ set-up helpers
    def _base_model_path(self) -> Path:
        cfg = self.cfg
        if cfg.model != "tiny":
            path = Path(cfg.model)
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"model={cfg.model!r} is not a local checkpoint directory (no config.json); "
                    "pass a saved transformers model or 'tiny'"
                )
            return path
        task_key = f"{self.task.name}/{cfg.task_digits}" if not cfg.data else f"jsonl/{cfg.data}"
        args = (self.task, task_key, cfg.seed, cfg.tiny_warmup_steps, cfg.tiny_hidden, cfg.tiny_layers)
        if self.dist.is_main:
            path = tiny_model_path(*args)
        distributed.barrier()  # rank 0 built (or found) it; the others now load it from the cache
        if not self.dist.is_main:
            path = tiny_model_path(*args)
        return path

    def _resume_path(self) -> Path | None:
        return checkpoint_path(self.cfg.resume, self.cfg.checkpoint_dir) if self.cfg.resume else None

    def _load_state(self, path: Path) -> str | None:
        state = torch.load(path / STATE_FILE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved = self.scheduler.base_lrs[0]
        if self.cfg.lr is not None and self.cfg.lr != saved:
            # An lr given on resume wins over the checkpoint's (the optimizer state would silently keep
            # the old one); the warm-up continues from the resumed step.
            self.scheduler.base_lrs = [self.cfg.lr] * len(self.scheduler.base_lrs)
            for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
                group["lr"] = self.cfg.lr * factor(self.scheduler.last_epoch)
            logger.warning("resuming %s with lr %g (the checkpoint was trained with lr %g)", path, self.cfg.lr, saved)
        self.lr = float(self.scheduler.base_lrs[0])
        self.rollout_step, self.opt_step, self.skipped = state["rollout_step"], state["opt_step"], state["skipped"]
        ranks = torch.load(path / f"rng-rank{self.dist.rank}.pt", weights_only=False)
        _set_rng_state(ranks["rng"])
        self.data_rng.setstate(ranks["data_rng"])
        return state.get("run_id")

    def save_checkpoint(self, directory: str | Path | None = None) -> Path | None:
        """Model, tokenizer, optimizer, scheduler, counters, options and every RNG state, under step-N.

        Written only once the streamed run holds every step logged so far (on the server, or in
        the client's spool while the server is away), so a process killed after the checkpoint
        and resumed from it never leaves a hole in the run's history; if the client cannot say so
        within `mhpo.client.DEFAULT_PERSIST_TIMEOUT` the checkpoint is skipped with a warning (returns None) and the
        previous one stays the latest. Written under `.tmp-step-N` and renamed when complete, so a
        process killed while saving never leaves a partial `step-N` for `--resume latest` to pick.
        """
        persisted = self.run.persist() if self.run is not None else True
        flag = torch.tensor([0.0 if persisted else 1.0], device=self.device)
        if distributed.all_reduce_sum(flag).item():
            logger.warning(
                "checkpoint step-%d skipped: the run's records up to optimizer step %d were not sent or spooled "
                "within %gs; the previous checkpoint stays the latest",
                self.rollout_step,
                self.opt_step - 1,
                mhpo.client.DEFAULT_PERSIST_TIMEOUT,
            )
            return None
        root = Path(directory or self.cfg.checkpoint_dir or "checkpoints")
        path = root / f"step-{self.rollout_step}"
        tmp = root / f".tmp-step-{self.rollout_step}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2), encoding="utf-8")
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rollout_step": self.rollout_step,
                    "opt_step": self.opt_step,
                    "skipped": self.skipped,
                    "run_id": self.run.id if self.run is not None else None,
                    "config": self.cfg.to_dict(),
                },
                tmp / STATE_FILE,
            )
        distributed.barrier()
        torch.save({"rng": _rng_state(), "data_rng": self.data_rng.getstate()}, tmp / f"rng-rank{self.dist.rank}.pt")
        distributed.barrier()
        if self.dist.is_main:
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        distributed.barrier()
        return path

    # ------------------------------------------------------------------ one rollout
    def step(self) -> list[dict[str, Any]]:
        """One rollout and its optimizer steps; returns one record per optimizer step."""
        cfg = self.cfg
        examples = self.task.sample(self.data_rng, cfg.prompts_per_step)
        prompt_ids = [self.tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
        sync = self.rollout_step % cfg.rollout_sync_every == 0
        gen = self.engine.generate(self.model, prompt_ids, cfg.group_size, sync=sync)
        b_completion = gen.input_ids[:, gen.prompt_width :]  # (N, T)
        texts = self.tokenizer.batch_decode(
            [row[m].tolist() for row, m in zip(b_completion, gen.completion_mask, strict=True)],
            skip_special_tokens=True,
        )
        b_examples = [e for e in examples for _ in range(cfg.group_size)]
        b_rewards = torch.tensor([self.task.reward(t, e) for t, e in zip(texts, b_examples, strict=True)])
        b_adv = group_advantages(b_rewards, cfg.group_size, cfg.advantage).to(self.device)
        t = cfg.temperature
        with torch.no_grad():
            b_old_logp, _ = token_logp(self.model, gen.input_ids, gen.attention_mask, gen.prompt_width, temperature=t)
            b_ref_logp = None
            if self.ref_model is not None:
                b_ref_logp, _ = token_logp(
                    self.ref_model, gen.input_ids, gen.attention_mask, gen.prompt_width, temperature=t
                )
        rollout_scalars = self._rollout_scalars(gen, b_rewards, texts)
        b_weight = b_changed = None  # (N, T) the sampler-trainer correction's per-token weights
        if cfg.is_correction != "none" and gen.rollout_logp is not None:
            b_weight, b_changed = correction_weights(
                b_old_logp, gen.rollout_logp, gen.completion_mask, cfg.is_correction, cfg.is_cap
            )

        records: list[dict[str, Any]] = []
        n = b_rewards.numel()
        mb_size = n // cfg.mini_batches
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n)
            for k in range(cfg.mini_batches):
                mb_idx = perm[k * mb_size : (k + 1) * mb_size].to(self.device)
                index = len(records)  # train/update_index: 0 is the on-policy first update of this rollout
                records.append(
                    self._update(
                        gen, mb_idx, b_old_logp, b_ref_logp, b_adv, rollout_scalars, index, b_weight, b_changed
                    )
                )
        self.rollout_step += 1
        return records

    def _rollout_scalars(self, gen: Generation, rewards: Tensor, texts: list[str]) -> dict[str, float]:
        """Rewards, group and length statistics, summed across ranks; `policy/truncated_frac` is the
        share of completions cut at `max_new_tokens` (no end-of-sequence token)."""
        g = self.cfg.group_size
        grouped = rewards.view(-1, g)
        degenerate = (grouped == grouped[:, :1]).all(dim=1).float().sum()
        distinct = sum(len(set(texts[i : i + g])) / g for i in range(0, len(texts), g))
        lengths = gen.completion_mask.sum(dim=1).float().cpu()
        sums: list[Tensor | float] = [
            rewards.sum(),
            (rewards**2).sum(),
            float(rewards.numel()),
            degenerate,
            float(grouped.shape[0]),
            distinct,
            lengths.sum(),
            gen.truncated.sum(),
        ]
        t = distributed.all_reduce_sum(torch.tensor([float(s) for s in sums], dtype=torch.float64, device=self.device))
        v = t.cpu().tolist()
        count = v[2]
        mean = v[0] / count
        out = {
            "reward/mean": mean,
            "reward/std": math.sqrt(max(v[1] / count - mean * mean, 0.0) * count / max(count - 1, 1)),
            "group/degenerate_frac": v[3] / v[4],
            "group/distinct_frac": v[5] / v[4],
            "policy/length_mean": v[6] / count,
            "policy/truncated_frac": v[7] / count,
            "train/rollout": float(self.rollout_step),
        }
        return out

    def _update(
        self,
        gen: Generation,
        mb_idx: Tensor,
        b_old_logp: Tensor,
        b_ref_logp: Tensor | None,
        b_adv: Tensor,
        rollout_scalars: dict[str, float],
        update_index: int,
        b_weight: Tensor | None = None,
        b_changed: Tensor | None = None,
    ) -> dict[str, Any]:
        """One optimizer step on the mini-batch `mb_idx` (micro-batched), streamed as one record.

        `b_weight` (N, T): the sampler-trainer correction's per-token weights, applied as per-token
        advantages (every registry loss is linear in A); the diagnostics see the plain advantages.
        """
        cfg = self.cfg
        lr = self.optimizer.param_groups[0]["lr"]
        acc = DiagnosticsAccumulator(cfg.loss, self.hparams, top_k=cfg.top_k_outliers)
        micro = cfg.micro_batch_size or mb_idx.numel()
        chunks = mb_idx.split(micro)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, reference KL
        # Each micro-batch weighs its share of what the aggregation divides by over the whole
        # mini-batch (all ranks; DDP averages gradients, hence the world size), so splitting a
        # mini-batch into micro-batches or ranks changes neither its loss nor its gradient.
        agg = cfg.agg or self.loss_fn.default_agg
        units = [agg_units(gen.completion_mask[mu_idx], agg).double() for mu_idx in chunks]
        units_total = distributed.all_reduce_sum(torch.stack(units).sum().reshape(1))[0].clamp(min=1)
        weights = [u * self.dist.world_size / units_total for u in units]
        local_x: list[Tensor] = []  # this rank's valid log-ratios, kept only for the per-rank metrics file
        for i, mu_idx in enumerate(chunks):
            sync = not self.dist.enabled or i == len(chunks) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                mu_mask = gen.completion_mask[mu_idx]
                mu_logp, mu_entropy = token_logp(
                    self.ddp,
                    gen.input_ids[mu_idx],
                    gen.attention_mask[mu_idx],
                    gen.prompt_width,
                    with_entropy=True,
                    temperature=cfg.temperature,
                )
                mu_adv = b_adv[mu_idx] if b_weight is None else b_adv[mu_idx].unsqueeze(-1) * b_weight[mu_idx]
                out = self.loss_fn(
                    mu_logp, b_old_logp[mu_idx], mu_adv, mu_mask, agg=cfg.agg, max_len=None, **self.hparams
                )
                loss = out.loss * weights[i].to(out.loss.dtype)
                if b_ref_logp is not None:
                    d = torch.where(mu_mask, b_ref_logp[mu_idx] - mu_logp, 0.0)
                    k3 = torch.exp(d) - d - 1.0
                    kl = ((k3 * mu_mask).sum(1) / mu_mask.sum(1).clamp(min=1)).mean()  # a mean over sequences
                    loss = loss + cfg.beta * kl * mu_idx.numel() / mb_idx.numel()
                    totals[1] += kl.detach() * mu_idx.numel() / mb_idx.numel()
                totals[0] += out.loss.detach() * weights[i]
                loss.backward()
            if cfg.metrics_file and self.dist.enabled:
                local_x.append((mu_logp.detach().float() - b_old_logp[mu_idx].float())[mu_mask])
            acc.update(
                mu_logp.detach(),
                b_old_logp[mu_idx],
                b_adv[mu_idx],
                mu_mask,
                loss_stats=out.stats,
                entropy=mu_entropy,
                token_ids=gen.input_ids[mu_idx, gen.prompt_width :],
                rollout_logp=None if gen.rollout_logp is None else gen.rollout_logp[mu_idx],
            )

        norms = [
            p.grad.detach().norm() if p.grad is not None else torch.zeros((), device=self.device) for p in self.params
        ]
        group_sq = {g: torch.zeros((), device=self.device) for g in PARAM_GROUPS}
        for g, nrm in zip(self.groups, norms, strict=True):
            group_sq[g] = group_sq[g] + nrm.float() ** 2
        total = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)  # the norm before clipping
        finite = bool(torch.isfinite(torch.stack([totals[0].float(), total.float()])).all())
        update_ratio = torch.zeros((), device=self.device)
        if finite:
            before = [p.detach().clone() for p in self.params]
            self.optimizer.step()
            self.scheduler.step()
            delta = torch.stack([(p.detach() - b).norm() for p, b in zip(self.params, before, strict=True)]).norm()
            weight = torch.stack([b.norm() for b in before]).norm()
            update_ratio = delta / weight.clamp(min=1e-12)
        else:
            self.skipped += 1
            message = (
                f"optimizer step {self.opt_step}: non-finite loss or grad-norm "
                f"(loss={totals[0].item()}, grad_norm={total.item()}); step skipped ({self.skipped} so far)"
            )
            logger.warning(message)
            if self.dist.is_main:
                tqdm.write(message)
        self.optimizer.zero_grad(set_to_none=True)

        totals = distributed.all_reduce_sum(totals) / self.dist.world_size
        stats = acc.compute()
        host = (
            torch.stack(
                [
                    total.float(),
                    update_ratio.float(),
                    *[group_sq[g].sqrt().float() for g in PARAM_GROUPS],
                    *totals.float(),
                ]
            )
            .cpu()
            .tolist()
        )
        scalars: dict[str, float] = {**rollout_scalars, **stats.scalars}
        scalars["grad/norm"] = host[0]
        scalars["grad/norm_after_clip"] = grad_norm_after_clip(host[0], cfg.max_grad_norm)
        scalars["grad/update_ratio"] = host[1]
        for g, value in zip(PARAM_GROUPS, host[2 : 2 + len(PARAM_GROUPS)], strict=True):
            if g in self.groups:
                scalars[f"grad/norm/{g}"] = value
        scalars["train/loss"] = host[-2]
        if self.ref_model is not None:
            scalars["policy/kl_ref"] = host[-1]
        scalars["train/lr"] = lr
        scalars["train/update_index"] = float(update_index)
        scalars["train/skipped"] = 0.0 if finite else 1.0
        scalars["train/skipped_total"] = float(self.skipped)
        if b_changed is not None:  # the share of the mini-batch's tokens the cap truncated (tis) or masked (mis)
            changed = distributed.all_reduce_sum(
                torch.stack([b_changed[mb_idx].sum(), gen.completion_mask[mb_idx].sum()]).double()
            )
            scalars["mismatch/corrected_frac"] = float(changed[0] / changed[1].clamp(min=1))
        outliers = [dict(o) for o in stats.outliers]
        for o in outliers:
            if not o.get("text") and o.get("token_id") is not None:
                o["text"] = self.tokenizer.decode([int(o["token_id"])])
        record = {
            "step": self.opt_step,
            "time": time.time(),
            "scalars": scalars,
            "histograms": stats.histograms,
            "outliers": outliers,
        }
        if self.dist.is_main and self.run is not None:
            self.run.log(
                record["step"], scalars=scalars, histograms=stats.histograms, outliers=outliers, time=record["time"]
            )
        if cfg.metrics_file:
            self._write_metrics(record, local_x)
        self.opt_step += 1
        return record

    def _write_metrics(self, record: dict[str, Any], local_x: list[Tensor]) -> None:
        """Rank 0 appends the record to `metrics_file`; under torchrun every rank also appends it to
        `<metrics_file>.rank<r>` with its own token count and `log_ratio` bin counts (the
        diagnostics' bins), to check what the cross-rank reduction merged."""
        lines = []
        if self.dist.is_main:
            lines.append((Path(self.cfg.metrics_file or ""), record))
        if self.dist.enabled:
            x = torch.cat(local_x) if local_x else torch.zeros(0)
            spec = HISTOGRAMS["log_ratio"]
            index = ((x - spec.lo) * (spec.bins / (spec.hi - spec.lo))).floor().clamp(-1, spec.bins).long() + 1
            cells = torch.bincount(index[~torch.isnan(x)], minlength=spec.bins + 2).tolist()
            local = {
                "tokens": int(x.numel()),
                "log_ratio": {"underflow": cells[0], "counts": cells[1:-1], "overflow": cells[-1]},
            }
            lines.append((Path(f"{self.cfg.metrics_file}.rank{self.dist.rank}"), {**record, "local": local}))
        for path, row in lines:
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, Any]]:
        """Run until `config.steps` rollouts, checkpointing as configured; finishes the streamed run.

        Returns the last rollout's records."""
        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps,
            initial=self.rollout_step,
            desc=cfg.run_name,
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        status = "failed"
        records: list[dict[str, Any]] = []
        try:
            while self.rollout_step < cfg.steps:
                records = self.step()
                last = records[-1]["scalars"]
                self.reward_history.append(last["reward/mean"])
                bar.set_postfix(
                    reward=f"{last['reward/mean']:.3f}",
                    hazard=f"{last.get('hazard/zeta_mean', math.nan):.3f}",
                    gnorm=f"{last['grad/norm']:.2f}",
                )
                bar.update(1)
                if cfg.checkpoint_dir and cfg.checkpoint_every and self.rollout_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if cfg.checkpoint_dir:
                self.save_checkpoint()
            status = "finished"
        finally:
            bar.close()
            self.close(status)
        return records

    def close(self, status: str = "finished") -> None:
        """Flush and finish the streamed run (rank 0)."""
        if self.run is not None:
            self.run.finish(status=status)
            self.run = None
