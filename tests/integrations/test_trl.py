"""TRL: the registry's grpo / dapo / cispo equal TRL's own loss_type (loss and gradients), and a
real GRPOTrainer run on CPU streams the diagnostics into a live server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import mhpo.client
from mhpo.integrations.trl import GRPOTrainer
from tests.fixtures.server import LiveServer
from tests.integrations.conftest import count_reward, cpu_threads, grpo_config, prompts

# (registry loss, its hyper-parameters, TRL loss_type, TRL epsilon, TRL epsilon_high)
PAIRS = [
    ("grpo", {"eps": 0.2}, "grpo", 0.2, 0.2),
    ("dapo", {"eps_low": 0.2, "eps_high": 0.28}, "dapo", 0.2, 0.28),
    # the bound 1 + eps_high here is epsilon_high in TRL; 1.2 so that the random ratios reach it
    ("cispo", {"eps_high": 0.2}, "cispo", 0.2, 1.2),
]


def make_trainer(
    model_dir: Path, tmp_path: Path, loss_type: str, eps: float, eps_high: float, **kw: Any
) -> GRPOTrainer:
    args = grpo_config(tmp_path, loss_type=loss_type, epsilon=eps, epsilon_high=eps_high, gradient_accumulation_steps=2)
    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=count_reward, args=args, train_dataset=prompts(), stream=False, **kw
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # what `train()` sets from the config
    return trainer


def random_batch(seed: int, vocab: int, model: Any) -> dict[str, Any]:
    """4 sequences, ragged completion masks (every sequence keeps a token), advantages of both signs,
    old log-probs a perturbation of the current ones, and a generation batch of twice these tokens."""
    g = torch.Generator().manual_seed(seed)
    b, p, t = 4, 3, 6
    lengths = torch.tensor([1, 6, 3, int(torch.randint(1, 7, (1,), generator=g))])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(4, vocab, (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(4, vocab, (b, t), generator=g),
        "completion_mask": mask,
        "advantages": torch.tensor([1.3, -0.7, 0.4, -1.1]) * (1 + torch.rand(b, generator=g)),
        "num_items_in_batch": mask.sum() * 2.0,
    }
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        logits = model(input_ids=ids).logits[:, p - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    batch["old_per_token_logps"] = logp + torch.randn(b, t, generator=g) * 0.3
    return batch


def loss_and_grads(trainer: GRPOTrainer, batch: dict[str, Any]) -> tuple[float, list[torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


@pytest.mark.parametrize(("name", "hparams", "loss_type", "eps", "eps_high"), PAIRS, ids=[p[0] for p in PAIRS])
def test_registry_loss_equals_trl_loss_type(
    tiny_model_dir: Path, tmp_path: Path, name, hparams, loss_type, eps, eps_high
) -> None:
    cpu_threads()
    trl_own = make_trainer(tiny_model_dir, tmp_path, loss_type, eps, eps_high)
    ours = make_trainer(tiny_model_dir, tmp_path, loss_type, eps, eps_high, loss=name, loss_hparams=hparams)
    vocab = trl_own.model.config.vocab_size
    for seed in range(4):
        batch = random_batch(seed, vocab, trl_own.model)
        expected, expected_grads = loss_and_grads(trl_own, batch)
        got, got_grads = loss_and_grads(ours, batch)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert len(got_grads) == len(expected_grads) > 0
        for a, b in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in got_grads)


def test_registry_loss_keeps_the_kl_term(tiny_model_dir: Path, tmp_path: Path) -> None:
    """beta > 0: TRL's KL term and its gradient survive the replaced policy term."""
    cpu_threads()
    trainers = []
    for kw in ({}, {"loss": "grpo", "loss_hparams": {"eps": 0.2}}):
        args = grpo_config(tmp_path, loss_type="grpo", beta=0.1, gradient_accumulation_steps=2)
        trainer = GRPOTrainer(
            model=str(tiny_model_dir), reward_funcs=count_reward, args=args, train_dataset=prompts(), stream=False, **kw
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 2
        trainers.append(trainer)
    batch = random_batch(7, trainers[0].model.config.vocab_size, trainers[0].model)
    batch["ref_per_token_logps"] = batch["old_per_token_logps"] - 0.2
    (l0, g0), (l1, g1) = (loss_and_grads(t, batch) for t in trainers)
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_unknown_registry_loss_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        make_trainer(tiny_model_dir, tmp_path, "grpo", 0.2, 0.2, loss="ppo")


@pytest.mark.parametrize(
    ("loss", "loss_type", "run_name", "expected"),
    [("mhpo", "grpo", None, "trl-mhpo"), (None, "dapo", None, "trl-dapo"), ("gspo", "grpo", "mine", "mine")],
)
def test_runs_are_named_by_their_loss(
    tiny_model_dir: Path,
    tmp_path: Path,
    live_server: LiveServer,
    loss: str | None,
    loss_type: str,
    run_name: str | None,
    expected: str,
) -> None:
    """Without a run_name, a run is called after its objective: a registry loss, else TRL's loss_type."""
    project = f"names-{loss}-{loss_type}"
    trainer = GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=count_reward,
        args=grpo_config(tmp_path, loss_type=loss_type, run_name=run_name),
        train_dataset=prompts(),
        loss=loss,
        mhpo_project=project,
        mhpo_server=live_server.url,
    )
    run = trainer.mhpo_run
    assert run is not None
    run.finish()
    runs = httpx.get(f"{live_server.url}/api/v1/runs", params={"project": project}).json()["runs"]
    assert [r["name"] for r in runs] == [expected]


def train_streamed(model_dir: Path, tmp_path: Path, server: LiveServer, project: str, **config: Any) -> list[dict]:
    """A real TRL run on the tiny model streamed into `server`'s `project`; that project's runs."""
    cpu_threads()
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=count_reward,
        args=grpo_config(tmp_path, **config),
        train_dataset=prompts(),
        mhpo_project=project,
        mhpo_server=server.url,
    )
    trainer.train()
    return httpx.get(f"{server.url}/api/v1/runs", params={"project": project}).json()["runs"]


def test_real_run_streams_into_a_live_server(tiny_model_dir: Path, tmp_path: Path, live_server: LiveServer) -> None:
    """num_iterations=2: the second update of each generation batch is off-policy, so the ratios move."""
    runs = train_streamed(
        tiny_model_dir, tmp_path, live_server, "trl-it", max_steps=4, num_iterations=2, run_name="trl-real"
    )
    assert [r["name"] for r in runs] == ["trl-real"] and runs[0]["status"] == "finished"
    api = f"{live_server.url}/api/v1/runs/{runs[0]['run_id']}"
    keys = httpx.get(f"{api}/keys").json()
    assert {
        "ratio/std",
        "hazard/zeta_mean",
        "policy/entropy",
        "entropy",
        "clip_ratio/region_mean",
        "ratio/clip_frac",
        "grad/norm",
        "grad_norm",
        "train/update_index",
        "reward/mean",
    } <= set(keys["scalars"])
    assert {"log_ratio", "psi", "zeta", "multiplier"} <= set(keys["histograms"])
    series = httpx.get(f"{api}/scalars", params={"keys": "train/update_index,ratio/std"}).json()["series"]
    assert series["train/update_index"]["step"] == [1, 2, 3, 4]
    assert series["train/update_index"]["value"] == [0.0, 1.0, 0.0, 1.0]
    std = dict(zip(series["ratio/std"]["step"], series["ratio/std"]["value"], strict=True))
    assert std[1] == 0.0 and std[3] == 0.0  # on-policy: x = 0 exactly
    assert std[2] > 0 and std[4] > 0
    hist = httpx.get(f"{api}/histograms/log_ratio").json()
    columns = dict(zip(hist["step"], hist["counts"], strict=True))
    zero_bin = round((0.0 - hist["lo"]) / ((hist["hi"] - hist["lo"]) / hist["bins"]))
    off_zero = sum(c for i, c in enumerate(columns[2]) if i != zero_bin) + hist["underflow"][1] + hist["overflow"][1]
    assert off_zero > 0, "the off-policy step's log-ratio histogram is all in the x = 0 bin"
    outliers = httpx.get(f"{api}/outliers", params={"step": 2}).json()["outliers"]
    assert outliers and all(o["text"] for o in outliers if o["token_id"] is not None)


def test_truncation_degenerate_groups_covariance_and_the_clipped_norm_arrive(
    tiny_model_dir: Path, tmp_path: Path, live_server: LiveServer
) -> None:
    """TRL's `completions/clipped_ratio` and `frac_reward_zero_std` under the product's keys, the
    accumulator's log-prob/advantage covariance, and the grad-norm before and after clipping at 0.05."""
    [run] = train_streamed(tiny_model_dir, tmp_path, live_server, "trl-signals", max_steps=3, max_grad_norm=0.05)
    keys = [
        "completions/clipped_ratio", "policy/truncated_frac", "frac_reward_zero_std", "group/degenerate_frac",
        "grad_norm", "grad/norm", "grad/norm_after_clip", "policy/cov_logp_adv", "policy/corr_logp_adv",
    ]  # fmt: skip
    api = f"{live_server.url}/api/v1/runs/{run['run_id']}/scalars"
    series = httpx.get(api, params={"keys": ",".join(keys)}).json()["series"]
    values = {k: dict(zip(series[k]["step"], series[k]["value"], strict=True)) for k in keys}
    generated = {"completions/clipped_ratio", "policy/truncated_frac", "frac_reward_zero_std", "group/degenerate_frac"}
    for key, v in values.items():  # num_iterations=2: a generation batch at steps 1 and 3 only
        assert sorted(v) == ([1, 3] if key in generated else [1, 2, 3]), key
    assert values["policy/truncated_frac"] == values["completions/clipped_ratio"]
    assert values["group/degenerate_frac"] == values["frac_reward_zero_std"]
    assert values["grad/norm"] == values["grad_norm"]
    for step, before in values["grad_norm"].items():
        assert values["grad/norm_after_clip"][step] == pytest.approx(min(before, 0.05), rel=1e-4)
    assert any(before > 0.05 for before in values["grad_norm"].values()), "clipping at 0.05 never bound"
    for step in (1, 2, 3):
        assert -1.0 <= values["policy/corr_logp_adv"][step] <= 1.0
    assert any(v != 0.0 for v in values["policy/cov_logp_adv"].values())


def test_resume_from_checkpoint_continues_the_run_rewound(
    tiny_model_dir: Path, tmp_path: Path, live_server: LiveServer
) -> None:
    """Train 4 steps saving at 2, resume from checkpoint-2 with another temperature and learning rate in a
    new trainer: one run, steps 1..2 from the first trajectory, 3..5 from the resumed one, a rewind event."""
    cpu_threads()
    first = grpo_config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, run_name="trl-resume")
    GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=count_reward,
        args=first,
        train_dataset=prompts(),
        mhpo_project="trl-it",
        mhpo_server=live_server.url,
    ).train()
    runs = httpx.get(f"{live_server.url}/api/v1/runs", params={"project": "trl-it"}).json()["runs"]
    assert len(runs) == 1
    api = f"{live_server.url}/api/v1/runs/{runs[0]['run_id']}"
    keys = "policy/entropy,ratio/std,loss,reward/mean"  # reward/mean: at generation steps (1, 3, 5) only

    def history() -> dict[str, dict[int, float]]:
        series = httpx.get(f"{api}/scalars", params={"keys": keys}).json()["series"]
        return {k: dict(zip(s["step"], s["value"], strict=True)) for k, s in series.items()}

    before = history()
    assert sorted(before["policy/entropy"]) == [1, 2, 3, 4] and sorted(before["reward/mean"]) == [1, 3]

    second = grpo_config(
        tmp_path,
        max_steps=5,
        save_strategy="steps",
        save_steps=2,
        run_name="other-name",
        temperature=1.7,
        learning_rate=5e-2,
    )
    GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=count_reward,
        args=second,
        train_dataset=prompts(),
        mhpo_project="trl-it",
        mhpo_server=live_server.url,
    ).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    runs = httpx.get(f"{live_server.url}/api/v1/runs", params={"project": "trl-it"}).json()["runs"]
    assert [(r["name"], r["status"]) for r in runs] == [("trl-resume", "finished")]
    after = history()
    for key in before:
        kept = {s: v for s, v in before[key].items() if s <= 2}
        assert {s: v for s, v in after[key].items() if s <= 2} == kept, key
    assert sorted(after["policy/entropy"]) == sorted(after["loss"]) == [1, 2, 3, 4, 5]
    assert sorted(after["reward/mean"]) == [1, 3, 5]
    # TRL divides the logits by the temperature, so from step 3 the entropies are the resumed run's;
    # the step-4 loss follows the step-3 update made with the other learning rate
    assert all(after["policy/entropy"][s] != before["policy/entropy"][s] for s in (3, 4))
    assert after["loss"][4] != before["loss"][4]
    events = httpx.get(f"{api}/events").json()["events"]
    assert [(e["type"], e["step"]) for e in events if e["type"] == "rewind"] == [("rewind", 2)]


def test_resume_from_the_latest_checkpoint(tiny_model_dir: Path, tmp_path: Path, live_server: LiveServer) -> None:
    """resume_from_checkpoint=True: the latest checkpoint in output_dir (transformers' choice) names the run
    and the step; a run passed as `mhpo_run` opts out (a new run here, the first one untouched)."""
    cpu_threads()
    args = grpo_config(tmp_path, max_steps=3, save_strategy="steps", save_steps=2, run_name="trl-latest")
    GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=count_reward,
        args=args,
        train_dataset=prompts(),
        mhpo_project="trl-it",
        mhpo_server=live_server.url,
    ).train()
    (run,) = httpx.get(f"{live_server.url}/api/v1/runs", params={"project": "trl-it"}).json()["runs"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    shutil.rmtree(out / "checkpoint-3")  # as if the process died at step 3 before saving it
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "mhpo_run.json").read_text())
    assert saved == {"project": "trl-it", "name": "trl-latest", "run_id": run["run_id"]}

    args = grpo_config(tmp_path, max_steps=4, save_strategy="no", run_name="trl-latest")
    GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=count_reward,
        args=args,
        train_dataset=prompts(),
        mhpo_project="trl-it",
        mhpo_server=live_server.url,
    ).train(resume_from_checkpoint=True)
    api = f"{live_server.url}/api/v1/runs/{run['run_id']}"
    series = httpx.get(f"{api}/scalars", params={"keys": "loss"}).json()["series"]
    assert series["loss"]["step"] == [1, 2, 3, 4]
    events = httpx.get(f"{api}/events").json()["events"]
    assert [(e["type"], e["step"]) for e in events if e["type"] == "rewind"] == [("rewind", 2)]

    own = mhpo.client.init("trl-it", "explicit", server=live_server.url)
    GRPOTrainer(
        model=str(tiny_model_dir), reward_funcs=count_reward, args=args, train_dataset=prompts(), mhpo_run=own
    ).train(resume_from_checkpoint=True)
    assert own.finish(timeout=30).complete
    assert httpx.get(f"{api}/scalars", params={"keys": "loss"}).json()["series"]["loss"]["step"] == [1, 2, 3, 4]
    assert httpx.get(f"{api}/events").json()["events"] == events
    mine = httpx.get(f"{live_server.url}/api/v1/runs/{own.id}/scalars", params={"keys": "loss"}).json()["series"]
    assert mine["loss"]["step"] == [3, 4]


def test_vllm_sampling_log_probs_give_the_mismatch_statistics(tiny_model_dir: Path, tmp_path: Path) -> None:
    """TRL keeps vLLM's per-token sampling log-probs in `sampling_per_token_logps` (NaN where vLLM gave none):
    the step's record carries the sampler-vs-trainer statistics against `old_per_token_logps`."""
    from mhpo.diagnostics import compute_step_stats

    cpu_threads()
    args = grpo_config(tmp_path, loss_type="grpo", gradient_accumulation_steps=1)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=count_reward, args=args, train_dataset=prompts())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = random_batch(3, trainer.model.config.vocab_size, trainer.model)
    sampling = batch["old_per_token_logps"] + torch.randn(4, 6, generator=torch.Generator().manual_seed(1)) * 0.05
    sampling[1, 2] = float("nan")  # a token vLLM could not score
    batch["sampling_per_token_logps"] = sampling
    trainer._compute_loss(trainer.model, batch)
    scalars = trainer._pending[1]["scalars"]
    mask = batch["completion_mask"]
    expected = compute_step_stats(
        "grpo", batch["old_per_token_logps"], batch["old_per_token_logps"], batch["advantages"], mask,
        rollout_logp=sampling,
    ).scalars  # fmt: skip
    for key in ("mismatch/abs_mean", "mismatch/kl_k3", "mismatch/is_mean", "mismatch/ess", "mismatch/unscored_frac"):
        assert scalars[key] == pytest.approx(expected[key], rel=1e-6), key
    assert scalars["mismatch/unscored_frac"] == pytest.approx(1 / mask.sum().item())
    assert "mismatch" in trainer._pending[1]["histograms"]


def test_a_checkpoint_is_saved_once_the_run_holds_its_steps(
    tiny_model_dir: Path, tmp_path: Path, live_server: LiveServer
) -> None:
    """transformers saves a checkpoint only after the run has every step up to it, logged or not."""
    cpu_threads()
    from transformers import TrainerCallback

    run = mhpo.client.init("trl-it", "persist", server=live_server.url, flush_interval=3600.0)
    stored_at_save: dict[int, list[int]] = {}

    class AtSave(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            scalars = httpx.get(
                f"{live_server.url}/api/v1/runs/{run.id}/scalars", params={"keys": "grad/multiplier_mean"}
            ).json()["series"]
            stored_at_save[state.global_step] = scalars.get("grad/multiplier_mean", {}).get("step", [])

    args = grpo_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, logging_steps=5)
    GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=count_reward,
        args=args,
        train_dataset=prompts(),
        mhpo_run=run,
        callbacks=[AtSave()],
    ).train()
    assert stored_at_save == {2: [1, 2]}
    assert run.finish(timeout=30).complete
