"""Micro-batch invariance of every aggregation, and SAPO's dtype and far-tail gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mhpo.losses import AGGREGATIONS, LOSSES, agg_units, aggregate, get_loss


def split_loss(per_token_fn, logp: torch.Tensor, mask: torch.Tensor, agg: str, sizes: list[int]) -> torch.Tensor:
    """The mini-batch loss rebuilt from micro-batches of `sizes` sequences, weighted by `agg_units`."""
    total = agg_units(mask, agg)
    loss = torch.zeros((), dtype=logp.dtype)
    for rows in torch.arange(logp.shape[0]).split(sizes):
        m = mask[rows]
        loss = loss + aggregate(per_token_fn(logp[rows], rows), m, agg) * agg_units(m, agg) / total.clamp(min=1)
    return loss


def test_the_one_and_three_token_example() -> None:
    """On-policy DAPO, A = +1 on a sequence of 1 token and -1 on one of 3, in two micro-batches:
    the mini-batch's loss 0.5 and gradient [-1/4 | 1/4 1/4 1/4], not 0.0 and [-1/2 | 1/6 1/6 1/6]."""
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    dapo = get_loss("dapo")
    whole = dapo(logp, logp.detach(), adv, mask).loss
    (g_whole,) = torch.autograd.grad(whole, logp)
    split = split_loss(
        lambda lp, rows: -adv[rows, None] * torch.exp(lp - lp.detach()), logp, mask, "token-mean", [1, 1]
    )
    (g_split,) = torch.autograd.grad(split, logp)
    assert whole.item() == pytest.approx(0.5) and split.item() == pytest.approx(0.5)
    assert g_whole[mask].tolist() == pytest.approx([-0.25, 0.25, 0.25, 0.25])
    assert g_split[mask].tolist() == pytest.approx([-0.25, 0.25, 0.25, 0.25])


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(2, 6),
    t=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    agg=st.sampled_from(AGGREGATIONS),
    name=st.sampled_from(sorted(LOSSES)),
    data=st.data(),
)
def test_splitting_a_mini_batch_changes_neither_loss_nor_gradient(b, t, seed, agg, name, data) -> None:
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.6  # ragged, some sequences empty
    cuts = sorted(data.draw(st.sets(st.integers(1, b - 1), max_size=b - 1)))
    sizes = [j - i for i, j in zip([0, *cuts], [*cuts, b], strict=True)]
    loss = get_loss(name)

    def per_token(lp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return loss(lp, old[rows], adv[rows], mask[rows], agg=agg).loss  # aggregated: undone below

    whole = loss(logp, old, adv, mask, agg=agg).loss
    (g_whole,) = torch.autograd.grad(whole, logp)
    split = torch.zeros((), dtype=torch.float64)
    total = agg_units(mask, agg).clamp(min=1)
    for rows in torch.arange(b).split(sizes):
        split = split + per_token(logp[rows], rows) * agg_units(mask[rows], agg) / total
    (g_split,) = torch.autograd.grad(split, logp)
    assert split.item() == pytest.approx(whole.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g_split, g_whole, rtol=1e-9, atol=1e-12)


def test_sapo_tau_keeps_float64() -> None:
    lp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    old = torch.full((1, 1), -0.5, dtype=torch.float64)
    out = get_loss("sapo")(lp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))
    z = 1.05 * math.expm1(0.5)
    assert out.loss.item() == pytest.approx(4.0 / 1.05 / (1.0 + math.exp(-z)), rel=1e-15)


@pytest.mark.parametrize(
    ("dtype", "x", "expected"), [(torch.float32, -20.0, -1.621e-9), (torch.float64, -38.0, -2.47e-17)]
)
def test_sapo_far_tail_gradient_is_not_cancelled(dtype: torch.dtype, x: float, expected: float) -> None:
    lp = torch.zeros(1, 1, dtype=dtype, requires_grad=True)
    old = torch.full((1, 1), -x, dtype=dtype)
    get_loss("sapo")(lp, old, torch.ones(1, dtype=dtype), torch.ones(1, 1, dtype=torch.bool)).loss.backward()
    assert lp.grad.item() == pytest.approx(expected, rel=1e-3)


@settings(max_examples=200, deadline=None)
@given(
    x=st.floats(-700, 30, allow_nan=False),
    adv=st.floats(-3, 3).filter(lambda a: abs(a) > 1e-3),
    tau_pos=st.floats(0.1, 5),
    tau_neg=st.floats(0.1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
# float32, z = 90.4: sigmoid's tail is subnormal, but its product with tau * r is not.
@example(x=4.0, adv=1.0, tau_pos=1.6875, tau_neg=1.0, dtype=torch.float32)
def test_sapo_gradient_is_minus_a_times_m(x, adv, tau_pos, tau_neg, dtype) -> None:
    if dtype == torch.float32:
        x = max(x, -80.0)  # exp(x) underflows float32 below about -103: both sides are 0 there
    lp = torch.zeros(1, 1, dtype=dtype, requires_grad=True)
    old = torch.full((1, 1), -x, dtype=dtype)
    a = torch.tensor([adv], dtype=dtype)
    sapo = get_loss("sapo")
    sapo(lp, old, a, torch.ones(1, 1, dtype=torch.bool), tau_pos=tau_pos, tau_neg=tau_neg).loss.backward()
    m = sapo.multiplier(torch.tensor([[x]], dtype=dtype), a, tau_pos=tau_pos, tau_neg=tau_neg)
    rel = 1e-4 if dtype == torch.float32 else 1e-10
    # Relative precision holds for normal numbers; below the dtype's smallest normal (float32:
    # 1.2e-38) a product of factors may round to a subnormal or to 0 on either side.
    assert lp.grad.item() == pytest.approx(-adv * m.item(), rel=rel, abs=torch.finfo(dtype).tiny)
