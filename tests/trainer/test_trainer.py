"""Real optimizer steps on the warmed-up tiny model: every loss, skipping, resume, config parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mhpo.losses import LOSSES
from mhpo.trainer import Trainer
from mhpo.trainer.cli import parse_config
from mhpo.trainer.tasks import make_task
from mhpo.trainer.tiny import tiny_model_path
from mhpo.trainer.trainer import group_advantages, param_group
from tests.trainer.helpers import small_config

DOCUMENTED_SCALARS = {
    "ratio/mean", "ratio/std", "ratio/min", "ratio/max", "ratio/p01", "ratio/p50", "ratio/p99",
    "ratio/pos_mass", "ratio/neg_mass", "ratio/frac_above_0.1", "ratio/frac_below_1", "ratio/clip_frac",
    "ratio/clip_frac_low", "ratio/clip_frac_high", "hazard/zeta_mean", "hazard/zeta_p99",
    "hazard/zeta_pos_mean", "hazard/zeta_neg_mean", "hazard/survival_mean", "grad/multiplier_mean",
    "grad/multiplier_min", "grad/multiplier_max", "grad/vanish_frac", "grad/norm", "grad/norm/embeddings",
    "grad/norm/attention", "grad/norm/mlp", "grad/norm/norm", "grad/norm/head", "grad/update_ratio",
    "policy/entropy", "policy/kl_k1", "policy/kl_k3", "policy/logp_mean", "policy/length_mean",
    "reward/mean", "reward/std", "group/degenerate_frac", "group/distinct_frac", "train/loss", "train/lr",
    "train/skipped", "policy/truncated_frac", "policy/cov_logp_adv", "policy/corr_logp_adv", "grad/norm_after_clip",
}  # fmt: skip


def params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_tiny_model_loads_through_auto_classes() -> None:
    task = make_task("addition", digits=1)
    path = tiny_model_path(task, "addition/1", seed=0, warmup_steps=40)
    assert tiny_model_path(task, "addition/1", seed=0, warmup_steps=40) == path  # cached
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("12+7=19", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and tok.decode(ids) == "12+7=19"
    assert model.config.vocab_size == len(tok)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_takes_real_optimizer_steps(loss: str) -> None:
    trainer = Trainer(small_config(loss=loss))
    before = params(trainer)
    records = trainer.step()
    assert [r["step"] for r in records] == [0, 1]  # 2 mini-batches -> 2 optimizer steps
    for record in records:
        s = record["scalars"]
        assert s.keys() >= DOCUMENTED_SCALARS, DOCUMENTED_SCALARS - s.keys()
        assert math.isfinite(s["train/loss"]) and math.isfinite(s["grad/norm"])
        assert s["train/skipped"] == 0.0
        assert {"log_ratio", "psi", "zeta", "multiplier"} <= record["histograms"].keys()
    assert records[0]["scalars"]["ratio/std"] == 0.0  # the first mini-batch is on-policy
    assert records[1]["scalars"]["ratio/std"] > 0.0  # the second sees the first update
    assert any(o["text"] for o in records[1]["outliers"])
    assert any(not torch.equal(a, b) for a, b in zip(before, params(trainer), strict=True))


def test_group_advantages() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    dr = group_advantages(rewards, 4, "drgrpo")
    assert torch.allclose(dr, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    std = group_advantages(rewards, 4, "grpo")
    assert torch.allclose(std[:4], dr[:4] / (rewards[:4].std() + 1e-4))
    assert torch.equal(std[4:], torch.zeros(4))  # a degenerate group has no signal


def test_param_groups_cover_llama_and_gpt2_names() -> None:
    assert param_group("model.embed_tokens.weight") == "embeddings"
    assert param_group("transformer.wte.weight") == "embeddings"
    assert param_group("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert param_group("model.layers.0.self_attn.q_norm.weight") == "norm"
    assert param_group("model.layers.1.mlp.down_proj.weight") == "mlp"
    assert param_group("transformer.h.0.ln_1.weight") == "norm"
    assert param_group("lm_head.weight") == "head"


def test_non_finite_loss_skips_the_step_and_reports_it(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    trainer = Trainer(small_config(beta=0.1, metrics_file=str(metrics)))
    assert trainer.ref_model is not None
    with torch.no_grad():  # a broken reference model makes the KL term, hence the loss, NaN
        trainer.ref_model.lm_head.weight.fill_(math.nan)
    before = params(trainer)
    records = trainer.step()
    assert [r["scalars"]["train/skipped"] for r in records] == [1.0, 1.0]
    assert records[-1]["scalars"]["train/skipped_total"] == 2.0
    assert all(torch.equal(a, b) for a, b in zip(before, params(trainer), strict=True))
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["scalars"]["train/skipped"] for r in logged] == [1.0, 1.0]


def test_reference_kl_is_reported() -> None:
    records = Trainer(small_config(beta=0.05)).step()
    assert records[0]["scalars"]["policy/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert records[1]["scalars"]["policy/kl_ref"] > 0.0


def test_resume_gives_the_same_next_step(tmp_path: Path) -> None:
    """3 uninterrupted steps == 2 steps, checkpoint, a fresh process-like Trainer resumed, 1 step."""
    straight = Trainer(small_config(steps=3))
    for _ in range(3):
        expected = straight.step()
    first = Trainer(small_config(steps=2, checkpoint_dir=str(tmp_path)))
    first.train()
    assert (tmp_path / "step-2" / "trainer_state.pt").exists()
    resumed = Trainer(small_config(steps=3, checkpoint_dir=str(tmp_path), resume="latest"))
    assert (resumed.rollout_step, resumed.opt_step) == (2, 4)
    got = resumed.step()
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [4, 5]
    for a, b in zip(expected, got, strict=True):
        assert a["scalars"] == b["scalars"]
        assert a["histograms"] == b["histograms"]
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_config_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("loss: grpo\nsteps: 7\nhparams: {eps: 0.1}\nprompts-per-step: 4\n")
    cfg = parse_config(["--config", str(path), "--steps", "9", "--hparam", "eps=0.3", "--no-stream"])
    assert (cfg.loss, cfg.steps, cfg.prompts_per_step, cfg.stream) == ("grpo", 9, 4, False)
    assert cfg.hparams == {"eps": 0.3}
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        parse_config(["--config", str(tmp_path / "bad.json")])


def test_bad_config_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="mini_batches=3"):
        small_config(mini_batches=3).validate()
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        Trainer(small_config(loss="grpo", hparams={"c": 1.0}))


def test_bfloat16_weights_keep_float32_statistics() -> None:
    trainer = Trainer(small_config(dtype="bfloat16"))
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    records = trainer.step()
    assert all(math.isfinite(r["scalars"]["train/loss"]) for r in records)
    assert records[1]["scalars"]["ratio/std"] > 0.0


def test_resume_keeps_the_checkpoints_lr_unless_one_is_given(tmp_path: Path) -> None:
    Trainer(small_config(steps=1, lr=1e-3, lr_warmup_steps=10, checkpoint_dir=str(tmp_path))).train()
    kept = Trainer(small_config(steps=2, lr_warmup_steps=10, checkpoint_dir=str(tmp_path), resume="latest"))
    assert kept.lr == 1e-3 and kept.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 10)
    changed = Trainer(small_config(steps=2, lr=2e-4, lr_warmup_steps=10, checkpoint_dir=str(tmp_path), resume="latest"))
    assert changed.lr == 2e-4 and changed.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * 3 / 10)
    records = changed.step()
    assert records[0]["scalars"]["train/lr"] == pytest.approx(2e-4 * 3 / 10)
    assert records[1]["scalars"]["train/lr"] == pytest.approx(2e-4 * 4 / 10)
