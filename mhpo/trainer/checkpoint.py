"""Finding a checkpoint and the options it was trained with; what `--resume` restores.

A resumed run continues the checkpointed one: every option the checkpoint recorded comes back
(loss, hyper-parameters, task, batch shape, server, project, name, ...), so `mhpo train
--checkpoint-dir ckpt --resume latest` alone continues the same training. An option the user
gave explicitly (on the command line or in `--config`) wins, and each one that differs from the
checkpoint's is named in one warning (old -> new). Which options were given explicitly is the
caller's business (the argument parser knows it), so `resumed_config` takes their names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from mhpo.trainer.config import SECRET_FIELDS, TrainerConfig, field_names

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "trainer_config.json"
NOT_RESTORED = frozenset({"resume"}) | SECRET_FIELDS


def latest_checkpoint(directory: str | Path) -> Path:
    """The highest complete `step-N` under `directory`."""
    steps = sorted(Path(directory).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not steps:
        raise FileNotFoundError(f"no step-N checkpoint in checkpoint_dir={directory}; train without --resume first")
    return steps[-1]


def checkpoint_path(resume: str, checkpoint_dir: str | None) -> Path:
    """The checkpoint `--resume` names: 'latest' in `checkpoint_dir`, or a step-N directory."""
    if resume == "latest":
        if not checkpoint_dir:
            raise ValueError("resume='latest' needs --checkpoint-dir; or pass the checkpoint path to --resume")
        return latest_checkpoint(checkpoint_dir)
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"resume={resume!r} has no {STATE_FILE}; give a step-N checkpoint directory")
    return path


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The options the checkpointed run was trained with (older checkpoints keep them only in the state file)."""
    if (path / CONFIG_FILE).exists():
        return dict(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
    import torch  # only for checkpoints written before CONFIG_FILE existed

    return dict(torch.load(path / STATE_FILE, weights_only=False).get("config") or {})


def resumed_config(
    config: TrainerConfig, stored: Mapping[str, Any], explicit: AbstractSet[str]
) -> tuple[TrainerConfig, dict[str, tuple[Any, Any]]]:
    """`stored` options (a checkpoint's) with those named in `explicit` taken from `config` instead.

    Returns the config to train with and, per explicitly given option that differs from the
    checkpoint's, `(old, new)`. Explicit `hparams` are merged into the stored ones by name, as
    `--hparam` merges into `--config`. Stored options this version does not know are ignored.
    """
    given = config.to_dict() | {name: getattr(config, name) for name in SECRET_FIELDS}
    values = dict(given)
    changes: dict[str, tuple[Any, Any]] = {}
    for name in sorted(field_names() - NOT_RESTORED):
        if name not in stored:
            continue
        old = stored[name]
        if name not in explicit:
            values[name] = old
            continue
        new = {**old, **given[name]} if name == "hparams" else given[name]
        values[name] = new
        if new != old:
            changes[name] = (old, new)
    return TrainerConfig(**values), changes


def resume_config(config: TrainerConfig, explicit: AbstractSet[str]) -> TrainerConfig:
    """`config` with the options of the checkpoint `config.resume` names restored; warns once about overrides."""
    if not config.resume:
        return config
    path = checkpoint_path(config.resume, config.checkpoint_dir)
    resumed, changes = resumed_config(config, checkpoint_config(path), explicit)
    if changes:
        logger.warning(
            "resuming from %s with options that differ from the checkpoint's: %s",
            path,
            "; ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items()),
        )
    return resumed
