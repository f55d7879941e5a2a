"""Sampler vs trainer statistics (`rollout_logp`) against a plain numpy reference, property-tested."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhpo.diagnostics import HISTOGRAMS, MISMATCH_BUCKETS, DiagnosticsAccumulator, compute_step_stats

KEYS = (
    "abs_mean", "abs_max", "kl_k1", "kl_k3", "is_mean", "is_min", "is_max", "is_std", "ess", "chi2", "seq_log_max",
    "prob_abs_mean", "prob_abs_max",
)  # fmt: skip


def reference(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> tuple[dict[str, float], list[int]]:
    """The formulas, token by token in float64 (d itself in float32, as the trainer's log-probs are)."""
    d_all = (old.float() - rollout.float()).double().numpy()
    o_all = old.float().double().numpy()
    m = mask.numpy().astype(bool)
    scored = m & ~np.isnan(d_all)
    d, o = d_all[scored], o_all[scored]
    out: dict[str, float] = {"unscored_frac": 1.0 - scored.sum() / m.sum()} if m.any() else {}
    if not d.size:
        return out, []
    w = np.exp(np.clip(d, -20, 20))
    seq = [d_all[i][scored[i]].sum() for i in range(d_all.shape[0]) if scored[i].any()]
    prob = np.abs(np.exp(o) - np.exp(o - d))
    out |= {
        "abs_mean": np.abs(d).mean(),
        "abs_max": np.abs(d).max(),
        "kl_k1": -d.mean(),
        "kl_k3": (w - d - 1).mean(),
        "is_mean": w.mean(),
        "is_min": w.min(),
        "is_max": w.max(),
        "is_std": w.std(),
        "ess": w.sum() ** 2 / (d.size * (w**2).sum()),
        "chi2": (w**2).mean() - 1,
        "seq_log_max": max(seq),
        "prob_abs_mean": prob.mean(),
        "prob_abs_max": prob.max(),
    }
    p = np.exp(o)
    for suffix, lo, hi in MISMATCH_BUCKETS:
        sel = (p >= lo) & (p < hi) if hi < 1 else p >= lo
        if sel.any():
            out[f"abs_mean_{suffix}"] = np.abs(d[sel]).mean()
    spec = HISTOGRAMS["mismatch"]
    # floor(d * bins / (hi - lo)) then the integer shift: exact for a float32 d (d - lo first would round
    # a tiny negative d up to the edge of the bin above).
    per_unit = spec.bins / (spec.hi - spec.lo)
    slots = np.clip(np.floor(d * per_unit) + round(-spec.lo * per_unit), -1, spec.bins).astype(int) + 1
    return out, np.bincount(slots, minlength=spec.bins + 2).tolist()


def assert_matches(scalars: dict[str, float], hists: dict, old, rollout, mask) -> None:
    expected, counts = reference(old, rollout, mask)
    got = {k.removeprefix("mismatch/"): v for k, v in scalars.items() if k.startswith("mismatch/")}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=2e-5, abs=2e-6), key
    if counts:
        h = hists["mismatch"]
        assert [h["underflow"], *h["counts"], h["overflow"]] == counts
    else:
        assert "mismatch" not in hists


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    finite = st.floats(-9.0, 0.0, allow_nan=False, width=32)
    old = np.array(draw(st.lists(finite, min_size=b * t, max_size=b * t)), dtype=np.float32).reshape(b, t)
    gap = st.one_of(st.floats(-0.0625, 0.0625, width=32), st.floats(-3.0, 3.0, width=32), st.just(0.0))
    shift = np.array(draw(st.lists(gap, min_size=b * t, max_size=b * t)), dtype=np.float32).reshape(b, t)
    mask = np.array(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    if draw(st.booleans()):
        mask[draw(st.integers(0, b - 1))] = False  # an empty row
    junk = st.sampled_from([math.inf, -math.inf, math.nan])
    rollout = old + shift
    for i, j in zip(*np.nonzero(~mask), strict=True):  # masked tokens may hold anything
        if draw(st.booleans()):
            rollout[i, j] = draw(junk)
        if draw(st.booleans()):
            old[i, j] = draw(junk)
    logp = torch.from_numpy(old).to(dtype)
    return logp, torch.from_numpy(old).to(dtype), torch.from_numpy(rollout).to(dtype), torch.from_numpy(mask), dtype


@settings(max_examples=150, deadline=None)
@given(batches())
def test_statistics_match_the_reference(batch) -> None:
    logp, old, rollout, mask, _ = batch
    adv = torch.linspace(-1, 1, logp.shape[0])
    stats = compute_step_stats("mhpo", logp, old, adv, mask, rollout_logp=rollout)
    assert_matches(stats.scalars, stats.histograms, old, rollout, mask)
    plain = compute_step_stats("mhpo", logp, old, adv, mask)
    same = {k: v for k, v in stats.scalars.items() if not k.startswith("mismatch/")}
    assert same.keys() == plain.scalars.keys()
    np.testing.assert_equal(same, plain.scalars)  # the other statistics do not change (NaN == NaN here)
    assert {k: v for k, v in stats.histograms.items() if k != "mismatch"} == plain.histograms


@settings(max_examples=40, deadline=None)
@given(batches(), st.integers(1, 4))
def test_micro_batches_merge_to_the_whole_step(batch, parts: int) -> None:
    logp, old, rollout, mask, _ = batch
    adv = torch.ones(logp.shape[0])
    acc = DiagnosticsAccumulator("grpo")
    for idx in torch.arange(logp.shape[0]).tensor_split(parts):
        acc.update(logp[idx], old[idx], adv[idx], mask[idx], rollout_logp=rollout[idx])
    stats = acc.compute()
    assert_matches(stats.scalars, stats.histograms, old, rollout, mask)


def test_unscored_valid_tokens_are_left_out_and_counted() -> None:
    """vLLM can return no log-prob for a token (TRL stores NaN there): it is counted, not averaged."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    rollout = torch.tensor([[-1.1, math.nan, -0.5, -2.9]])
    stats = compute_step_stats(
        "grpo", old, old, torch.ones(1), torch.ones(1, 4, dtype=torch.bool), rollout_logp=rollout
    )
    s = stats.scalars
    assert s["mismatch/unscored_frac"] == pytest.approx(0.25)
    assert s["mismatch/abs_mean"] == pytest.approx(0.2 / 3, rel=1e-5)
    assert all(math.isfinite(v) for k, v in s.items() if k.startswith("mismatch/"))


def test_an_infinite_gap_on_a_valid_token_is_not_hidden() -> None:
    old = torch.tensor([[-1.0, -2.0]])
    rollout = torch.tensor([[-1.0, -math.inf]])
    s = compute_step_stats("grpo", old, old, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), rollout_logp=rollout)
    assert s.scalars["mismatch/abs_mean"] == math.inf
    assert s.scalars["mismatch/is_max"] == pytest.approx(math.exp(20.0))  # w clamped at exp(20)


def test_top_k_processing_shows_as_the_surviving_mass() -> None:
    """Log-probs after top-k renormalise over the kept tokens: w = exp(d) is the mass the trainer gives them."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    full = torch.log_softmax(logits, -1)
    top = logits.topk(5, -1)
    kept = torch.log_softmax(top.values, -1)
    old, rollout = full.gather(-1, top.indices[:, :1]), kept[:, :1]
    s = compute_step_stats("grpo", old, old, torch.ones(64), torch.ones(64, 1, dtype=torch.bool), rollout_logp=rollout)
    mass = full.gather(-1, top.indices).exp().sum(-1)
    assert s.scalars["mismatch/is_mean"] == pytest.approx(mass.mean().item(), rel=1e-5)
    assert s.scalars["mismatch/kl_k1"] > 0


def test_mixing_updates_with_and_without_rollout_logp_is_named() -> None:
    x = torch.zeros(2, 3)
    acc = DiagnosticsAccumulator("grpo")
    acc.update(x, x, torch.ones(2), torch.ones(2, 3), rollout_logp=x)
    acc.update(x, x, torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="rollout_logp was given for 1 of the step's 2 micro-batches"):
        acc.compute()
    with pytest.raises(ValueError, match="rollout_logp has shape"):
        acc.update(x, x, torch.ones(2), torch.ones(2, 3), rollout_logp=torch.zeros(2, 4))


def test_empty_step_with_rollout_logp_has_no_mismatch_keys() -> None:
    x = torch.zeros(2, 3)
    s = compute_step_stats("grpo", x, x, torch.ones(2), torch.zeros(2, 3, dtype=torch.bool), rollout_logp=x - 1)
    assert s.scalars == {"tokens/valid": 0.0} and s.histograms == {}
