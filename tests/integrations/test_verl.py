"""verl: the registry losses registered through verl's own `register_policy_loss`, parity with `vanilla`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import torch
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
from verl.workers.config import FSDPActorConfig

import mhpo.integrations.verl as mverl
from mhpo.losses import LOSSES
from tests.fixtures.server import REPO_ROOT, LiveServer


def actor_config(**overrides: float | None) -> FSDPActorConfig:
    """verl's own actor config, as its FSDP worker passes it to the policy loss."""
    values = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    values.update(overrides)
    return FSDPActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, **values)


def batch(seed: int, b: int = 6, t: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).contiguous()
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float64)
    return old, logp, adv, mask


def test_every_registry_loss_is_registered_without_clashing() -> None:
    assert set(mverl.VERL_NAMES) == {"mhpo", *(f"mhpo_{n}" for n in LOSSES if n != "mhpo")}
    assert "vanilla" in POLICY_LOSS_REGISTRY and POLICY_LOSS_REGISTRY["vanilla"].__module__.startswith("verl.")
    for verl_name in mverl.VERL_NAMES:
        assert get_policy_loss_fn(verl_name).__module__ == "mhpo.integrations.verl"


def test_get_policy_loss_fn_mhpo_runs_with_verls_signature() -> None:
    old, logp, adv, mask = batch(0)
    fn = get_policy_loss_fn("mhpo")
    pg_loss, metrics = fn(
        old_log_prob=old,
        log_prob=logp,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode="seq-mean-token-mean",
        config=actor_config(),
        rollout_is_weights=None,
    )
    pg_loss.backward()
    assert pg_loss.shape == () and torch.isfinite(pg_loss) and logp.grad.abs().sum() > 0
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize(
    ("ours", "overrides"),
    [
        ("mhpo_grpo", {"clip_ratio_low": None, "clip_ratio_high": None, "clip_ratio_c": 1e9}),
        ("mhpo_dapo", {"clip_ratio_c": 1e9}),
        ("mhpo_dual_clip", {"clip_ratio_low": None, "clip_ratio_high": None, "clip_ratio_c": 3.0}),
    ],
)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("weights", [False, True])
def test_parity_with_verls_vanilla(ours: str, overrides: dict, agg: str, weights: bool) -> None:
    """Dual clip off (clip_ratio_c huge) for grpo/dapo; on (3.0) for dual_clip. Loss, gradient, clip fraction."""
    config = actor_config(**overrides)
    for seed in range(5):
        old, logp, adv, mask = batch(seed)
        is_weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
        kwargs = {"loss_agg_mode": agg, "config": config, "rollout_is_weights": is_weights if weights else None}
        expected, expected_metrics = get_policy_loss_fn("vanilla")(old, logp, adv, mask, **kwargs)
        (g_expected,) = torch.autograd.grad(expected, logp)
        got, metrics = get_policy_loss_fn(ours)(old, logp, adv, mask, **kwargs)
        (g_got,) = torch.autograd.grad(got, logp)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_got, g_expected, rtol=1e-10, atol=1e-12)
        assert metrics["actor/ppo_kl"] == pytest.approx(expected_metrics["actor/ppo_kl"], rel=1e-9, abs=1e-12)
        if ours != "mhpo_dual_clip":
            assert metrics["actor/pg_clipfrac"] == pytest.approx(
                expected_metrics["actor/pg_clipfrac"], abs=1e-7
            )  # verl: float32


def test_cispo_parity_with_verls_cispo() -> None:
    config = actor_config()
    for seed in range(3):
        old, logp, adv, mask = batch(seed)
        expected, _ = get_policy_loss_fn("cispo")(old, logp, adv, mask, loss_agg_mode="token-mean", config=config)
        (g_expected,) = torch.autograd.grad(expected, logp)
        got, _ = get_policy_loss_fn("mhpo_cispo")(old, logp, adv, mask, loss_agg_mode="token-mean", config=config)
        (g_got,) = torch.autograd.grad(got, logp)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_got, g_expected, rtol=1e-10, atol=1e-12)


def test_hparams_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mverl.HPARAMS_ENV, '{"c": 2.0}')
    assert mverl.hparams_from("mhpo", actor_config())["c"] == 2.0
    monkeypatch.setenv(mverl.HPARAMS_ENV, '{"eps": 0.3}')
    assert mverl.hparams_from("grpo", actor_config()) == {"eps": 0.3}
    monkeypatch.setenv(mverl.HPARAMS_ENV, '{"nope": 1}')
    with pytest.raises(ValueError, match="unknown hyper-parameter nope for loss 'mhpo'"):
        mverl.hparams_from("mhpo", actor_config())


def test_rank0_streams_one_record_per_optimizer_step(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two optimizer steps of 6 sequences, each in two micro-batches of 3: two records, the two updates
    of one rollout (MHPO_UPDATES_PER_ROLLOUT=2)."""
    monkeypatch.setattr(mverl, "STREAM", mverl._Stream())
    monkeypatch.setenv("MHPO_PROJECT", "verl-it")
    monkeypatch.setenv("MHPO_RUN_NAME", "verl-run")
    monkeypatch.setenv("MHPO_SERVER", live_server.url)
    monkeypatch.setenv("MHPO_UPDATES_PER_ROLLOUT", "2")
    config = actor_config()
    config.global_batch_info.update(dp_size=1, global_batch_size=6, batch_num_tokens=None, loss_scale_factor=None)
    fn = get_policy_loss_fn("mhpo")
    for step in range(2):
        old, logp, adv, mask = batch(step)
        for rows in (slice(0, 3), slice(3, 6)):
            fn(old[rows], logp[rows], adv[rows], mask[rows], loss_agg_mode="seq-mean-token-mean", config=config)
    mverl.STREAM.run.finish()
    [run] = httpx.get(f"{live_server.url}/api/v1/runs", params={"project": "verl-it"}).json()["runs"]
    assert (run["name"], run["last_step"], run["loss"]) == ("verl-run", 1, "mhpo")
    series = httpx.get(f"{live_server.url}/api/v1/runs/{run['run_id']}/scalars", params={"keys": "ratio/std"}).json()[
        "series"
    ]["ratio/std"]
    assert series["step"] == [0, 1] and all(v > 0 for v in series["value"])
    kinds = httpx.get(
        f"{live_server.url}/api/v1/runs/{run['run_id']}/scalars", params={"keys": "train/update_index,train/rollout"}
    ).json()["series"]
    assert kinds["train/update_index"]["value"] == [0.0, 1.0] and kinds["train/rollout"]["value"] == [0.0, 0.0]
    cov = httpx.get(
        f"{live_server.url}/api/v1/runs/{run['run_id']}/scalars",
        params={"keys": "policy/cov_logp_adv,policy/corr_logp_adv"},
    ).json()["series"]
    for step in range(2):  # over both micro-batches of the step, verl's per-token advantages
        old, logp, adv, mask = batch(step)
        a, lp = adv[mask.bool()], logp.detach()[mask.bool()]
        expected = ((a - a.mean()) * (lp - lp.mean())).mean().item()
        assert cov["policy/cov_logp_adv"]["value"][step] == pytest.approx(expected, rel=1e-9)
        assert cov["policy/corr_logp_adv"]["value"][step] == pytest.approx(torch.corrcoef(torch.stack([a, lp]))[0, 1])


def test_verl_imports_it_as_an_external_module() -> None:
    """verl's own plugin hook: VERL_USE_EXTERNAL_MODULES makes `import verl` register the losses."""
    code = "import verl; from verl.trainer.ppo.core_algos import get_policy_loss_fn; print(get_policy_loss_fn('mhpo').__name__)"
    env = {
        **os.environ,
        "VERL_USE_EXTERNAL_MODULES": "mhpo.integrations.verl",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "compute_policy_loss_mhpo"


def test_updates_per_rollout_must_be_a_whole_number(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = mverl._Stream()
    assert stream.position() == {}
    for bad in ("0", "2.5", "many"):
        monkeypatch.setenv("MHPO_UPDATES_PER_ROLLOUT", bad)
        with pytest.raises(ValueError, match="MHPO_UPDATES_PER_ROLLOUT"):
            stream.position()
    monkeypatch.setenv("MHPO_UPDATES_PER_ROLLOUT", "4")
    stream.step = 9
    assert stream.position() == {"train/rollout": 2.0, "train/update_index": 1.0}


def test_rollout_correction_weights_give_the_mismatch_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's own TIS weights (rollout_is="token", threshold 2): the tokens below the threshold give their rollout
    log-probs back; the truncated ones are unscored, as if the engine had not scored them."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    from mhpo.diagnostics import compute_step_stats

    monkeypatch.setattr(mverl, "STREAM", mverl._Stream())
    monkeypatch.setenv("MHPO_PROJECT", "verl-mm")
    old, logp, adv, mask = batch(11)
    rollout = old - torch.randn(old.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5
    weights, _ = compute_rollout_correction_weights(old - rollout, mask, "token", 2.0)
    config = actor_config()
    config.global_batch_info.update(dp_size=1, global_batch_size=1000, batch_num_tokens=None, loss_scale_factor=None)
    get_policy_loss_fn("mhpo_grpo")(old, logp, adv, mask, "token-mean", config, rollout_is_weights=weights)
    got = mverl.STREAM.acc.compute().scalars
    truncated = ((old - rollout).exp() >= 2.0) & (mask > 0)
    assert truncated.any()
    expected = compute_step_stats(
        "grpo", logp.detach(), old, adv, mask, rollout_logp=rollout.masked_fill(truncated, float("nan"))
    ).scalars
    assert got["mismatch/unscored_frac"] == pytest.approx(truncated.sum().item() / mask.sum().item())
    for key in ("mismatch/abs_mean", "mismatch/kl_k1", "mismatch/is_mean", "mismatch/ess", "mismatch/chi2"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key
    monkeypatch.setenv(mverl.THRESHOLD_ENV, "two")
    with pytest.raises(ValueError, match="MHPO_ROLLOUT_IS_THRESHOLD='two' must be a number"):
        mverl.rollout_log_probs(old, weights)
