"""`TrainerConfig`: every knob of `mhpo train`, with its help text next to it.

The same dataclass is filled from a YAML/JSON file (`--config`) and from flags; flags win.
Counting conventions (as in TRL/verl): one *step* is one rollout (`prompts_per_step * group_size`
completions) followed by `ppo_epochs * mini_batches` optimizer steps; each optimizer step is
streamed as one record whose `step` is the optimizer-step index.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SECRET_FIELDS = frozenset({"token"})


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainerConfig:
    # model and data
    model: str = _help("local checkpoint directory, or 'tiny' for the built-in warmed-up tiny Llama", default="tiny")
    task: str = _help("built-in task: addition | countdown (ignored when --data is given)", default="addition")
    task_digits: int = _help("digits per operand of the addition task", default=1)
    data: str | None = _help("JSONL file with 'prompt' and 'answer' fields per line", default=None)
    reward: str = _help("reward function for --data: exact | numeric | regex", default="exact")
    reward_pattern: str | None = _help("regex for --reward regex (a group named 'answer' is compared)", default=None)
    tiny_warmup_steps: int = _help("supervised warm-up steps of the tiny model (cached on disk)", default=40)
    tiny_hidden: int = _help("hidden size of the tiny model", default=128)
    tiny_layers: int = _help("layers of the tiny model", default=2)
    # objective
    loss: str = _help("registry loss: mhpo | grpo | dapo | dual_clip | gspo | sapo | cispo", default="mhpo")
    hparams: dict[str, float] = _help("loss hyper-parameters, e.g. --hparam c=1.5 (repeatable)", default_factory=dict)
    agg: str | None = _help("aggregation override (default: the loss's own)", default=None)
    advantage: str = _help("grpo (group std-normalised) | drgrpo (mean-centred only)", default="grpo")
    beta: float = _help("weight of the reference-model KL (k3) term; 0 disables the reference model", default=0.0)
    # rollout
    rollout: str = _help("generation engine: transformers | vllm", default="transformers")
    prompts_per_step: int = _help("prompts per rollout (per rank)", default=8)
    group_size: int = _help("completions per prompt (G)", default=8)
    max_new_tokens: int = _help("completion length limit", default=6)
    temperature: float = _help("sampling temperature", default=1.0)
    top_k: int = _help(
        "sample from the k most likely tokens only (0: off); the sampler's log-probs are then those of the "
        "renormalised distribution, as engines return them",
        default=0,
    )
    top_p: float = _help("nucleus sampling: the smallest set of tokens holding this mass (1: off)", default=1.0)
    rollout_dtype: str = _help(
        "sampler weights: same (the training weights) | float32 | bfloat16 | float16; another dtype samples "
        "with a copy of the policy, as a bf16 inference engine does",
        default="same",
    )
    rollout_sync_every: int = _help(
        "refresh the sampler's weights every K rollouts (K > 1: a stale sampler, as an un-synced engine or async RL)",
        default=1,
    )
    is_correction: str = _help(
        "sampler-trainer correction of the policy loss: none | tis (truncated IS, weight min(w, cap)) | "
        "mis (masked IS, weight 0 where w > cap); w = exp(old_logp - rollout_logp)",
        default="none",
    )
    is_cap: float = _help("the cap of --is-correction (verl's default 2.0; TRL's 3.0)", default=2.0)
    vllm_gpu_memory_utilization: float = _help("vLLM memory share of the GPU", default=0.3)
    # optimisation
    steps: int = _help("rollout steps to train", default=20)
    ppo_epochs: int = _help("passes over each rollout", default=1)
    mini_batches: int = _help("optimizer steps per pass over a rollout (>= 2 so ratios move)", default=2)
    micro_batch_size: int = _help(
        "sequences per forward/backward (gradient accumulation); 0 = whole mini-batch", default=0
    )
    lr: float | None = _help("AdamW learning rate (default 5e-4 for tiny, 1e-6 for a checkpoint)", default=None)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    lr_warmup_steps: int = _help("optimizer steps of linear lr warm-up", default=4)
    max_grad_norm: float = _help("grad-norm clipping threshold", default=1.0)
    seed: int = _help("seed of the model init, the data and the sampling", default=0)
    device: str = _help("auto | cpu | cuda", default="auto")
    dtype: str = _help(
        "weights dtype: float32 | bfloat16 | float16 (log-probs and losses stay float32)", default="float32"
    )
    # streaming and bookkeeping
    stream: bool = _help("stream records to the server (--no-stream disables)", default=True)
    server: str | None = _help("server URL (default: MHPO_SERVER or http://127.0.0.1:8765)", default=None)
    token: str | None = _help("API token (default: MHPO_TOKEN); never stored in the run's config", default=None)
    project: str = _help("project name in the dashboard", default="mhpo")
    name: str | None = _help("run name (default: <loss>-<task>-s<seed>)", default=None)
    top_k_outliers: int = _help("outlier tokens streamed per step", default=8)
    metrics_file: str | None = _help("also append every record as a JSON line here (rank 0)", default=None)
    checkpoint_dir: str | None = _help("where checkpoints go (step-N subdirectories)", default=None)
    checkpoint_every: int = _help("checkpoint every N rollout steps (0: only at the end)", default=0)
    resume: str | None = _help(
        "checkpoint directory to resume from, or 'latest' in --checkpoint-dir; restores the checkpoint's options, "
        "and options given now override them (with a warning naming each change)",
        default=None,
    )
    progress: bool = _help("show the progress bar", default=True)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.loss}-{Path(self.data).stem if self.data else self.task}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """Every option but the secrets (`token`): what the run's config and checkpoints record."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET_FIELDS}

    def validate(self) -> None:
        """Raise ValueError naming the field, the value and the fix."""
        positive = ("prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "mini_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2 for group-relative advantages")
        if self.advantage not in ("grpo", "drgrpo"):
            raise ValueError(f"advantage={self.advantage!r} is unknown; use grpo or drgrpo")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} is unknown; use float32, bfloat16 or float16")
        if self.rollout not in ("transformers", "vllm"):
            raise ValueError(f"rollout={self.rollout!r} is unknown; use transformers or vllm")
        if self.rollout_dtype not in ("same", "float32", "bfloat16", "float16"):
            raise ValueError(f"rollout_dtype={self.rollout_dtype!r} is unknown; use same, float32, bfloat16 or float16")
        if self.rollout_sync_every < 1:
            raise ValueError(f"rollout_sync_every={self.rollout_sync_every} must be >= 1 (1: sync every rollout)")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_k={self.top_k}, top_p={self.top_p}: need top_k >= 0 (0: off) and 0 < top_p <= 1")
        if self.is_correction not in ("none", "tis", "mis"):
            raise ValueError(f"is_correction={self.is_correction!r} is unknown; use none, tis or mis")
        if not self.is_cap > 0:
            raise ValueError(f"is_cap={self.is_cap} must be > 0, e.g. 2.0")
        if not self.max_grad_norm > 0:  # clip_grad_norm_ with 0 zeroes the gradients, with < 0 flips them
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0, e.g. 1.0 (inf: no clipping)")
        batch = self.prompts_per_step * self.group_size
        if batch % self.mini_batches:
            raise ValueError(
                f"mini_batches={self.mini_batches} must divide prompts_per_step*group_size={batch}; "
                "change --mini-batches or --group-size"
            )
        if self.resume == "latest" and not self.checkpoint_dir:
            raise ValueError("resume='latest' needs --checkpoint-dir; or pass the checkpoint path to --resume")


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainerConfig)}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """YAML or JSON mapping of TrainerConfig fields; unknown keys are an error."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option: value, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - field_names())
    if unknown:
        raise ValueError(f"config file {p}: unknown option(s) {', '.join(unknown)}; see `mhpo train --help`")
    return data
