"""A tiny Llama and character tokenizer saved locally (no download), and TRL trainers built on it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from mhpo.trainer.tiny import char_tokenizer, tiny_config

CHARSET = "0123456789+= abcdefghij"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = char_tokenizer(CHARSET)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), hidden=32, layers=1, heads=2))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _quiet_trl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, no telemetry, no stray logger; the client spools under the test's tmp dir."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "MHPO_SPOOL_DIR": str(tmp_path / "spool"),
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(key, value)


def count_reward(completions: list[str], **_: Any) -> list[float]:
    """A reward that varies inside a group: the number of digits in the completion."""
    return [float(sum(c.isdigit() for c in text)) for text in completions]


def grpo_config(tmp_path: Path, **overrides: Any) -> Any:
    from trl import GRPOConfig

    values: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 3,
        "num_iterations": 2,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "beta": 0.0,
        "temperature": 1.0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    values.update(overrides)
    return GRPOConfig(**values)


def prompts() -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+6=", "7+8=", "9+1=", "2+2=", "4+4=", "6+6="]})


def cpu_threads() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tracking(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Point the mlflow client at a server; restore its global state afterwards."""
    import mlflow  # only the MLflow tests pay for importing it

    def point(url: str, token: str | None = None) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        if token is not None:
            monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
        mlflow.set_tracking_uri(url)

    yield point
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
