"""GPU paths: the trainer on CUDA and `--rollout vllm` with its log-prob mismatch.

Self-contained (the tiny model is built on the spot); skipped with the reason where CUDA or
vLLM is missing. Run alone with `python -m pytest tests/trainer/test_gpu.py -m gpu`.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from mhpo.trainer import Trainer
from tests.trainer.helpers import small_config

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install 'mhpo[vllm]')"
)


@needs_cuda
def test_trainer_steps_on_cuda() -> None:
    trainer = Trainer(small_config(device="cuda"))
    assert next(trainer.model.parameters()).is_cuda
    records = trainer.step()
    assert records[1]["scalars"]["ratio/std"] > 0 and math.isfinite(records[1]["scalars"]["grad/norm"])


@needs_cuda
@needs_vllm
def test_vllm_rollout_reports_the_engine_mismatch() -> None:
    trainer = Trainer(small_config(device="cuda", rollout="vllm", steps=2))
    for _ in range(2):  # the second rollout runs on weights pushed after the first updates
        records = trainer.step()
    s = records[0]["scalars"]
    assert {"mismatch/abs_mean", "mismatch/kl_k1", "mismatch/kl_k3", "mismatch/is_mean", "mismatch/ess"} <= s.keys()
    # the engine samples from the weights the trainer just pushed: its log-probs agree closely
    assert s["mismatch/abs_mean"] < 0.05, s
    assert s["ratio/std"] == 0.0  # the policy-update ratio is separate from the engine mismatch


@needs_cuda
@needs_vllm
def test_vllm_rollout_marks_the_completions_cut_at_the_limit() -> None:
    """vLLM's finish reason "length" is a completion of the full width whose last token is no eos."""
    trainer = Trainer(small_config(device="cuda", rollout="vllm", max_new_tokens=2, prompts_per_step=8))
    examples = trainer.task.sample(trainer.data_rng, 8)
    prompt_ids = [trainer.tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    gen = trainer.engine.generate(trainer.model, prompt_ids, 4)
    lengths = gen.completion_mask.sum(1)
    last = gen.input_ids[:, gen.prompt_width :].gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    for cut, n, tok in zip(gen.truncated.tolist(), lengths.tolist(), last.tolist(), strict=True):
        assert cut == (n == 2 and tok not in trainer.eos_ids), (cut, n, tok)
