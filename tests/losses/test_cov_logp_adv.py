"""`policy/cov_logp_adv` and `policy/corr_logp_adv` against numpy, property-tested over micro-batch splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhpo.diagnostics import DiagnosticsAccumulator, compute_step_stats

COV, CORR = "policy/cov_logp_adv", "policy/corr_logp_adv"


def reference(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> tuple[float, float] | None:
    """Covariance and Pearson correlation of A and logp over the valid tokens, token by token in float64;
    0.0 and 0.0 when either is constant; None without a valid token."""
    m = mask.numpy().astype(bool)
    if not m.any():
        return None
    a_full = adv.double().numpy()
    a = (a_full[:, None] if a_full.ndim == 1 else a_full) * np.ones(m.shape)
    a, lp = a[m], logp.double().numpy()[m]
    if np.ptp(a) == 0 or np.ptp(lp) == 0:
        return 0.0, 0.0
    cov = float(np.mean((a - a.mean()) * (lp - lp.mean())))
    return cov, float(np.corrcoef(a, lp)[0, 1])


@st.composite
def steps(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(logp, old_logp, advantages, mask, micro-batch sizes). Values on a grid (logp in multiples of
    1/16, A of 1/8), so a non-constant set has a spread far above the float64 rounding of its sums;
    garbage (NaN, inf) on masked tokens must change nothing."""
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, 10))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    grid = st.lists(st.integers(-160, 0), min_size=b * t, max_size=b * t)
    logp = torch.tensor(draw(grid), dtype=dtype).reshape(b, t) / 16
    per_token = draw(st.booleans())
    adv_size = b * t if per_token else b
    adv = torch.tensor(draw(st.lists(st.integers(-16, 16), min_size=adv_size, max_size=adv_size)), dtype=dtype) / 8
    adv = adv.reshape(b, t) if per_token else adv
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    junk = draw(st.sampled_from([0.0, math.nan, math.inf, -math.inf]))
    logp = logp.masked_fill(~mask, junk)
    adv = adv.masked_fill(~mask, junk) if per_token else adv.masked_fill(~mask.any(1), junk)  # a row with no token
    old = torch.where(mask, logp + 0.25, 0.0)
    cuts = sorted(draw(st.lists(st.integers(1, b), max_size=3, unique=True)))
    sizes = np.diff([0, *[c for c in cuts if c < b], b]).tolist()
    return logp, old, adv, mask, sizes


@settings(max_examples=200, deadline=None)
@given(steps())
def test_covariance_and_correlation_match_numpy_whatever_the_micro_batches(step) -> None:
    logp, old, adv, mask, sizes = step
    acc = DiagnosticsAccumulator("grpo")
    for lp, o, a, m in zip(*(v.split(sizes) for v in (logp, old, adv, mask)), strict=True):
        acc.update(lp, o, a, m)
    s = acc.compute().scalars
    expected = reference(logp, adv, mask)
    if expected is None:
        assert COV not in s and CORR not in s  # an empty step: no statistic that needs a token
        return
    assert s[COV] == pytest.approx(expected[0], rel=1e-9, abs=1e-12)
    assert s[CORR] == pytest.approx(expected[1], rel=1e-9, abs=1e-12)
    assert -1.0 <= s[CORR] <= 1.0


def test_a_degenerate_step_reports_zero_not_nan() -> None:
    """Every group gave one reward: every advantage is 0, so there is no covariance and no correlation."""
    logp = torch.tensor([[-0.1, -2.0, -0.7], [-1.5, -0.2, -3.0]])
    for adv in (torch.zeros(2), torch.full((2,), 0.3), torch.full((2, 3), -1.25)):
        s = compute_step_stats("grpo", logp, logp, adv, torch.ones(2, 3, dtype=torch.bool)).scalars
        assert (s[COV], s[CORR]) == (0.0, 0.0)
    constant = torch.full((2, 3), -0.6931)  # every sampled token at probability 1/2
    s = compute_step_stats("grpo", constant, constant, torch.tensor([1.0, -1.0]), torch.ones(2, 3)).scalars
    assert (s[COV], s[CORR]) == (0.0, 0.0)


def test_rewarding_the_confident_tokens_is_a_positive_covariance() -> None:
    """Cui et al. 2025: high-probability tokens with positive advantage lower the entropy; cov > 0, corr 1 here."""
    logp = torch.tensor([[-0.05, -0.1], [-2.0, -3.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    s = compute_step_stats("grpo", logp, logp, adv, torch.ones(2, 2, dtype=torch.bool)).scalars
    a, lp = adv.double().flatten().numpy(), logp.double().flatten().numpy()
    assert s[COV] == pytest.approx(np.mean((a - a.mean()) * (lp - lp.mean())), rel=1e-12) and s[COV] > 0
    s = compute_step_stats("grpo", logp, logp, -adv, torch.ones(2, 2, dtype=torch.bool)).scalars
    assert s[COV] < 0 and s[CORR] < -0.9


def test_a_small_spread_far_from_zero_keeps_its_digits() -> None:
    """float32 log-probs near -20 that differ by ~1e-3: float64 moments keep the covariance exact."""
    g = torch.Generator().manual_seed(0)
    logp = -20.0 + 1e-3 * torch.randn(64, 256, generator=g)
    adv = torch.randn(64, generator=g)
    mask = torch.rand(64, 256, generator=g) > 0.3
    s = compute_step_stats("grpo", logp, logp, adv, mask).scalars
    cov, corr = reference(logp, adv, mask)  # type: ignore[misc]
    assert s[COV] == pytest.approx(cov, rel=1e-9)
    assert s[CORR] == pytest.approx(corr, rel=1e-9)


def test_a_nan_log_prob_on_a_valid_token_is_not_hidden() -> None:
    logp = torch.tensor([[-1.0, math.nan, -0.5]])
    s = compute_step_stats("grpo", logp, logp, torch.ones(1), torch.ones(1, 3, dtype=torch.bool)).scalars
    assert math.isnan(s[COV]) and math.isnan(s[CORR])
