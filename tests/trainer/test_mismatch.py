"""The trainer records the sampler's log-probs and streams the sampler-vs-trainer statistics; the
bf16, stale and top-k samplers and the TIS / MIS corrections, on real steps of the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

from mhpo.trainer import Trainer
from mhpo.trainer.correction import correction_weights
from mhpo.trainer.rollout import token_logp
from tests.trainer.helpers import small_config


def mismatch_of(records: list[dict]) -> list[float]:
    return [r["scalars"]["mismatch/abs_mean"] for r in records]


def test_a_synced_float32_sampler_agrees_with_the_trainer() -> None:
    trainer = Trainer(small_config(steps=2))
    for _ in range(2):
        records = trainer.step()
        s = records[0]["scalars"]
        assert s["mismatch/abs_mean"] < 1e-4 and abs(s["mismatch/is_mean"] - 1) < 1e-4, s
        assert s["mismatch/ess"] > 0.9999 and "mismatch" in records[0]["histograms"]
        assert not any(k.startswith("mismatch/log_ratio") for k in s)


def test_the_recorded_log_probs_are_those_of_the_processed_scores() -> None:
    """top_k = 3 at temperature 0.7: each sampled token's recorded log-prob is its log-prob renormalised over
    the 3 likeliest tokens of the tempered distribution, so d is the log of the mass those 3 hold."""
    trainer = Trainer(small_config(top_k=3, temperature=0.7))
    prompts = [
        trainer.tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        for e in trainer.task.sample(trainer.data_rng, 4)
    ]
    gen = trainer.engine.generate(trainer.model, prompts, 4)
    with torch.no_grad():
        out = trainer.model(input_ids=gen.input_ids, attention_mask=gen.attention_mask)
        logits = out.logits[:, gen.prompt_width - 1 : -1].float() / 0.7
        old, _ = token_logp(trainer.model, gen.input_ids, gen.attention_mask, gen.prompt_width, temperature=0.7)
    mass = torch.softmax(logits, -1).topk(3, -1).values.sum(-1)
    valid = gen.completion_mask
    torch.testing.assert_close((old - gen.rollout_logp)[valid], mass.log()[valid], atol=2e-4, rtol=1e-4)
    assert bool((gen.rollout_logp[valid] >= old[valid] - 1e-5).all())


def test_a_bfloat16_sampler_disagrees_a_little() -> None:
    trainer = Trainer(small_config(rollout_dtype="bfloat16", steps=3))
    assert next(trainer.model.parameters()).dtype == torch.float32
    gaps = [g for _ in range(3) for g in mismatch_of(trainer.step())]
    assert next(trainer.engine.sampler.parameters()).dtype == torch.bfloat16
    assert all(1e-4 < g < 0.05 for g in gaps), gaps


def test_a_stale_sampler_drifts_until_its_weights_are_refreshed() -> None:
    trainer = Trainer(small_config(rollout_sync_every=3, steps=4, lr=2e-3))
    per_rollout = [max(mismatch_of(trainer.step())) for _ in range(4)]
    assert per_rollout[0] < 1e-4 and per_rollout[3] < 1e-4, per_rollout  # rollouts 0 and 3 sample synced
    # Both stale rollouts drift. Whether the second drifts further than the first depends on where the
    # second update moved the policy (back towards the sampler's weights, or away), not on the sampler.
    assert min(per_rollout[1:3]) > 1e-3, per_rollout


@pytest.mark.parametrize("cap", [1.5, 2.0, 3.0])
def test_tis_and_mis_weights_are_verl_s_and_trl_s(cap: float) -> None:
    g = torch.Generator().manual_seed(int(cap * 10))
    old = torch.randn(6, 9, generator=g) - 2
    rollout = old - torch.randn(6, 9, generator=g) * 0.8
    mask = torch.rand(6, 9, generator=g) > 0.25
    log_ratio = old - rollout
    verl_tis, _ = compute_rollout_correction_weights(log_ratio, mask.float(), "token", cap)
    tis = correction_weights(old, rollout, mask, "tis", cap)
    torch.testing.assert_close(tis.weight, verl_tis)
    verl_mis, _ = compute_rollout_correction_weights(log_ratio, mask.float(), "token", f"1e-30_{cap}")
    mis = correction_weights(old, rollout, mask, "mis", cap)
    torch.testing.assert_close(mis.weight, verl_mis)
    trl_mask = torch.exp(log_ratio * mask).masked_fill(torch.exp(log_ratio * mask) > cap, 0.0) * mask  # token_mask
    torch.testing.assert_close(mis.weight, trl_mask)
    assert int(tis.changed.sum()) == int(((log_ratio.exp() > cap) & mask).sum()) > 0


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_a_corrected_run_reweights_its_loss_and_says_how_much(mode: str) -> None:
    plain = Trainer(small_config(rollout_sync_every=3, steps=3, lr=2e-3))
    a = [plain.step() for _ in range(2)][-1]
    # A cap between 1 and the largest weight the uncorrected run saw binds, whichever way the first
    # update moved the policy (the weights' spread above 1 depends on it, not on the correction).
    top = max(r["scalars"]["mismatch/is_max"] for r in a)
    assert top > 1.0, top
    cap = (1.0 + top) / 2
    fixed = Trainer(small_config(rollout_sync_every=3, steps=3, lr=2e-3, is_correction=mode, is_cap=cap))
    b = [fixed.step() for _ in range(2)][-1]  # built after: the global RNG starts from the same seed
    assert "mismatch/corrected_frac" not in a[0]["scalars"]
    frac = [r["scalars"]["mismatch/corrected_frac"] for r in b]
    assert all(0 <= f <= 1 for f in frac) and max(frac) > 0
    # Same data (same seed, same first rollout's update), different loss once the weights differ from 1.
    assert a[0]["scalars"]["mismatch/abs_mean"] == pytest.approx(b[0]["scalars"]["mismatch/abs_mean"])
    assert a[0]["scalars"]["train/loss"] != pytest.approx(b[0]["scalars"]["train/loss"])
    assert math.isfinite(b[-1]["scalars"]["grad/norm"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rollout_dtype", "int8", "rollout_dtype='int8' is unknown"),
        ("rollout_sync_every", 0, "rollout_sync_every=0 must be >= 1"),
        ("top_p", 0.0, "top_p=0.0"),
        ("is_correction", "icepop", "is_correction='icepop' is unknown"),
        ("is_cap", 0.0, "is_cap=0.0 must be > 0"),
    ],
)
def test_bad_sampler_options_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_config(**{field: value}).validate()
