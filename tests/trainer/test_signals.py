"""The trainer's truncation, log-prob/advantage covariance and clipped grad-norm, from real runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mhpo.trainer import Trainer, TrainerConfig
from mhpo.trainer.rollout import Generation
from tests.fixtures.server import REPO_ROOT
from tests.trainer.helpers import small_config


def train(tmp_path: Path, *flags: str) -> list[dict[str, Any]]:
    """`mhpo train` on the tiny model, 4 prompts x 4 completions, every record read back from --metrics-file."""
    metrics = tmp_path / "metrics.jsonl"
    command = [sys.executable, "-m", "mhpo", "train", "--prompts-per-step", "4", "--group-size", "4"]
    command += ["--no-stream", "--no-progress", "--metrics-file", str(metrics), *flags]
    proc = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_mhpo_train_streams_truncation_covariance_and_the_clipped_norm(tmp_path: Path) -> None:
    records = train(tmp_path, "--steps", "3", "--max-new-tokens", "4", "--max-grad-norm", "0.05")
    assert len(records) == 6  # 3 rollouts x 2 mini-batches
    clipped = 0
    for r in records:
        s = r["scalars"]
        assert 0.0 <= s["policy/truncated_frac"] <= 1.0
        assert (s["policy/truncated_frac"] * 16).is_integer()  # a share of the rollout's 16 completions
        assert math.isfinite(s["policy/cov_logp_adv"]) and -1.0 <= s["policy/corr_logp_adv"] <= 1.0
        assert math.copysign(1.0, s["policy/cov_logp_adv"]) == math.copysign(1.0, s["policy/corr_logp_adv"])
        before, after = s["grad/norm"], s["grad/norm_after_clip"]
        assert after == pytest.approx(min(before, 0.05), rel=1e-4)
        clipped += after < before
    assert clipped > 0, "a threshold of 0.05 never bound: the test does not see clipping"
    assert any(r["scalars"]["policy/cov_logp_adv"] != 0.0 for r in records)


def test_a_one_token_limit_truncates_every_completion(tmp_path: Path) -> None:
    """Every answer of the task has a digit before its end-of-sequence token: one token cuts them all."""
    records = train(tmp_path, "--steps", "1", "--max-new-tokens", "1")
    assert [r["scalars"]["policy/truncated_frac"] for r in records] == [1.0, 1.0]


def test_truncated_frac_counts_the_completions_cut_at_the_limit() -> None:
    """Two tokens: a one-digit sum ends (digit, end-of-sequence), a two-digit one is cut. The share is
    checked against the sampled completions, counted as: full length and the last token not an eos."""
    trainer = Trainer(small_config(max_new_tokens=2, prompts_per_step=8, steps=1))
    generations: list[Generation] = []
    generate = trainer.engine.generate

    def keep(*args: Any, **kwargs: Any) -> Generation:
        gen = generate(*args, **kwargs)
        generations.append(gen)
        return gen

    trainer.engine.generate = keep
    records = trainer.step()
    gen = generations[0]
    lengths = gen.completion_mask.sum(1)
    last = gen.input_ids[:, gen.prompt_width :].gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    cut = [int(n) == 2 and int(tok) not in trainer.eos_ids for n, tok in zip(lengths, last, strict=True)]
    expected = sum(cut) / len(cut)
    assert 0.0 < expected < 1.0, "the sampled sums were all of one width: the test checks nothing"
    assert {r["scalars"]["policy/truncated_frac"] for r in records} == {expected}


def test_a_grad_clip_threshold_that_is_not_positive_is_refused() -> None:
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="max_grad_norm"):
            TrainerConfig(max_grad_norm=bad).validate()
