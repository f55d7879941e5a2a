"""Small trainer configs shared by the tests."""

from __future__ import annotations

from typing import Any

from mhpo.trainer import TrainerConfig


def small_config(**overrides: Any) -> TrainerConfig:
    """A rollout of 4 prompts x 4 completions, 2 optimizer steps, no streaming."""
    values: dict[str, Any] = {
        "prompts_per_step": 4,
        "group_size": 4,
        "max_new_tokens": 4,
        "steps": 1,
        "stream": False,
        "progress": False,
        "seed": 0,
    }
    values.update(overrides)
    return TrainerConfig(**values)
