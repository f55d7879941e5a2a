"""The loss registry against hand-derived values, autograd, gradcheck and hypothesis properties."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhpo.losses import AGGREGATIONS, LOSSES, aggregate, get_loss, register_loss
from mhpo.losses.mhpo import DEFAULTS

NAMES = ["mhpo", "grpo", "dapo", "dual_clip", "gspo", "sapo", "cispo"]
F64 = torch.float64


def tokens(xs: list[float], adv: float | list[float], logp: float = -1.0) -> tuple[torch.Tensor, ...]:
    """(N, 1) inputs: each token its own sequence, so token-mean weights every token 1/N."""
    x = torch.tensor(xs, dtype=F64).reshape(-1, 1)
    lp = torch.full_like(x, logp).requires_grad_(True)
    old = (lp - x).detach()
    a = torch.as_tensor(adv, dtype=F64).expand(x.shape[0]).clone()
    return lp, old, a, torch.ones_like(x, dtype=torch.bool)


def per_token_grad(name: str, xs: list[float], adv: float, **hp: float) -> torch.Tensor:
    lp, old, a, m = tokens(xs, adv)
    get_loss(name)(lp, old, a, m, agg="token-mean", **hp).loss.backward()
    return lp.grad.reshape(-1) * len(xs)


def mhpo_reference(x: float, c: float = 1.5, kp: float = 1.5, lp: float = 1.0, kn: float = 2.0, ln: float = 0.8):
    """(per-token loss with A = 1, M) from the paper's formulas (arXiv 2603.16929), in plain math."""
    psi = c * math.tanh(x / c)

    def softplus(z: float) -> float:
        return math.log1p(math.exp(z))

    zeta = (softplus(psi) / lp) ** kp + (softplus(-psi) / ln) ** kn
    return -math.exp(psi - zeta), math.exp(psi - zeta) / math.cosh(x / c) ** 2


# ---------------------------------------------------------------- registry and bad input


def test_registry_holds_the_seven_losses() -> None:
    assert list(LOSSES) == NAMES
    assert get_loss("mhpo").defaults == {"c": 1.5, "k_pos": 1.5, "lambda_pos": 1.0, "k_neg": 2.0, "lambda_neg": 0.8}
    assert get_loss("grpo").default_agg == "seq-mean-token-mean"
    assert get_loss("dapo").default_agg == "token-mean"


def test_unknown_loss_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'ppo'.*cispo, dapo, dual_clip, grpo, gspo, mhpo, sapo"):
        get_loss("ppo")


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        register_loss("grpo", defaults={}, agg="token-mean", multiplier=lambda x, a, hp: x)(lambda i, hp: (i.x, {}))
    assert LOSSES["grpo"].defaults == {"eps": 0.2}


def test_a_new_loss_registers_and_runs() -> None:
    @register_loss("test_linear", defaults={"scale": 2.0}, agg="token-mean", multiplier=lambda x, a, hp: x * 0 + 1)
    def linear(inputs, hp):  # type: ignore[no-untyped-def]
        return -hp["scale"] * inputs.x * inputs.adv, {}

    try:
        lp, old, a, m = tokens([0.5, 0.3], 1.0)
        assert get_loss("test_linear")(lp, old, a, m).loss.item() == pytest.approx(-0.8)
        assert get_loss("test_linear")(lp, old, a, m, scale=3.0).loss.item() == pytest.approx(-1.2)
        assert get_loss("test_linear").clip_bounds() is None
    finally:
        del LOSSES["test_linear"]


def test_unknown_hyper_parameter_names_it_and_the_valid_ones() -> None:
    lp, old, a, m = tokens([0.1], 1.0)
    with pytest.raises(ValueError, match="unknown hyper-parameter epsilon for loss 'grpo'; valid: eps"):
        get_loss("grpo")(lp, old, a, m, epsilon=0.1)
    with pytest.raises(ValueError, match=re.escape("mhpo: hyper-parameter c=-1.0 must be > 0")):
        get_loss("mhpo")(lp, old, a, m, c=-1.0)
    with pytest.raises(ValueError, match="eps=nan must be a finite number"):
        get_loss("grpo")(lp, old, a, m, eps=math.nan)


def test_unknown_aggregation_names_it() -> None:
    lp, old, a, m = tokens([0.1], 1.0)
    with pytest.raises(ValueError, match="unknown aggregation agg='mean'; valid: seq-mean-token-mean"):
        get_loss("mhpo")(lp, old, a, m, agg="mean")


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 3), (2, 4), (2,), (2, 3)), r"old_logp has shape \(2, 4\) but logp has shape \(2, 3\)"),
        (((2, 3), (2, 3), (2,), (3, 2)), r"mask has shape \(3, 2\) but logp has shape \(2, 3\)"),
        (((2, 3), (2, 3), (3,), (2, 3)), r"advantages has shape \(3,\); expected \(2,\) or \(2, 3\)"),
        (((6,), (6,), (1,), (6,)), r"logp must be \(B, T\), got shape \(6,\)"),
    ],
)
def test_mismatched_shapes_name_the_argument(shapes: tuple, message: str) -> None:
    lp, old, a, m = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        get_loss("grpo")(lp, old, a, m.bool())


# ---------------------------------------------------------------- hand-derived values


def loss_of(name: str, xs: list[float], adv: float, logp: float = -1.0, **kw) -> float:
    lp, old, a, m = tokens(xs, adv, logp)
    return get_loss(name)(lp, old, a, m, agg="token-mean", **kw).loss.item()


def test_mhpo_values_at_hand_points() -> None:
    # r = 1: psi = 0, zeta = ln2^1.5 + (ln2 / 0.8)^2 = 1.3278, exp(-zeta) = 0.2651.
    zeta0 = math.log(2) ** 1.5 + (math.log(2) / 0.8) ** 2
    assert zeta0 == pytest.approx(1.3278, abs=1e-4)
    assert loss_of("mhpo", [0.0], 1.0) == pytest.approx(-math.exp(-zeta0), rel=1e-12)
    for x in (-3.0, -0.5, 0.3, 2.0):
        assert loss_of("mhpo", [x], -2.0) == pytest.approx(-2.0 * mhpo_reference(x)[0], rel=1e-12)
    assert loss_of("mhpo", [0.3], 1.0, c=2.0, k_pos=1.0) == pytest.approx(mhpo_reference(0.3, c=2.0, kp=1.0)[0])


def test_grpo_dapo_dual_clip_values() -> None:
    assert loss_of("grpo", [math.log(1.5)], 1.0) == pytest.approx(-1.2)  # clipped at 1 + eps
    assert loss_of("grpo", [math.log(0.5)], -1.0) == pytest.approx(0.8)  # clipped at 1 - eps
    assert loss_of("grpo", [math.log(1.1)], 2.0) == pytest.approx(-2.2)  # inside
    assert loss_of("grpo", [math.log(3.0)], -1.0) == pytest.approx(3.0)  # min picks r * A
    assert loss_of("dapo", [math.log(1.25)], 1.0) == pytest.approx(-1.25)  # under 1 + eps_high = 1.28
    assert loss_of("dapo", [math.log(1.5)], 1.0) == pytest.approx(-1.28)
    assert loss_of("dual_clip", [math.log(5.0)], -1.0) == pytest.approx(3.0)  # capped at -A * clip_c
    assert loss_of("dual_clip", [math.log(2.0)], -1.0) == pytest.approx(2.0)
    assert loss_of("dual_clip", [math.log(5.0)], 1.0) == pytest.approx(-1.2)


def test_gspo_uses_the_sequence_ratio() -> None:
    lp = torch.full((1, 3), -1.0, dtype=F64, requires_grad=True)
    old = (lp - torch.tensor([[0.1, 0.3, 50.0]], dtype=F64)).detach()
    mask = torch.tensor([[True, True, False]])
    s = math.exp(0.2)
    out = get_loss("gspo")(lp, old, torch.tensor([-1.0], dtype=F64), mask)
    assert out.loss.item() == pytest.approx(s)  # A < 0, s > 1 + eps_high: the min keeps s * A
    assert out.stats["seq_log_ratio"].tolist() == pytest.approx([0.2])
    out.loss.backward()
    assert lp.grad.reshape(-1).tolist() == pytest.approx([s / 2, s / 2, 0.0])
    lp.grad = None
    get_loss("gspo")(lp, old, torch.tensor([1.0], dtype=F64), mask).loss.backward()
    assert lp.grad.abs().sum().item() == 0.0  # A > 0, clipped at 1 + 4e-4: no gradient


def test_sapo_and_cispo_values() -> None:
    assert loss_of("sapo", [0.0], 1.0) == pytest.approx(-2.0)
    assert loss_of("sapo", [math.log(2.0)], 1.0) == pytest.approx(-4.0 / (1.0 + math.exp(-1.0)))
    assert loss_of("sapo", [0.0], -1.0) == pytest.approx(4.0 / 1.05 * 0.5)
    assert loss_of("cispo", [math.log(10.0)], 1.0, logp=-1.0) == pytest.approx(6.0)  # weight truncated at 1 + 5
    assert loss_of("cispo", [math.log(0.1)], 1.0, logp=-2.0) == pytest.approx(0.2)  # no lower clip by default
    assert loss_of("cispo", [math.log(0.1)], 1.0, logp=-2.0, eps_low=0.5) == pytest.approx(1.0)


def test_aggregations_by_hand() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    assert AGGREGATIONS == ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
    assert aggregate(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(per_token, mask, "token-mean").item() == pytest.approx(10.0 / 4)
    assert aggregate(per_token, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10.0 / (3 * 3))
    assert aggregate(per_token, mask, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(10.0 / 30)
    with pytest.raises(ValueError, match="max_len is only used by agg='seq-mean-token-sum-norm'"):
        aggregate(per_token, mask, "token-mean", max_len=10)


# ---------------------------------------------------------------- gradients


def test_mhpo_gradient_is_minus_a_times_the_multiplier() -> None:
    xs = [-4.0, -1.0, -0.2, 0.0, 0.05, 0.7, 3.0]
    for adv in (1.5, -0.5):
        grad = per_token_grad("mhpo", xs, adv)
        expected = [-adv * mhpo_reference(x)[1] for x in xs]
        assert grad.tolist() == pytest.approx(expected, rel=1e-10)


def test_zeta_carries_no_gradient() -> None:
    """Autograd of the loss equals the reference with sg[zeta], not the one where zeta is differentiated."""
    x = torch.linspace(-2, 2, 41, dtype=F64)

    def surrogate(stop: bool) -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        c, hp = DEFAULTS["c"], DEFAULTS
        psi = c * torch.tanh(xr / c)
        p = psi.detach() if stop else psi
        zeta = (torch.nn.functional.softplus(p) / hp["lambda_pos"]) ** hp["k_pos"]
        zeta = zeta + (torch.nn.functional.softplus(-p) / hp["lambda_neg"]) ** hp["k_neg"]
        torch.exp(psi - (zeta.detach() if stop else zeta)).sum().backward()
        return xr.grad

    grad = -per_token_grad("mhpo", x.tolist(), 1.0)
    assert torch.allclose(grad, surrogate(stop=True), rtol=1e-10)
    assert not torch.allclose(grad, surrogate(stop=False), rtol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_multiplier_matches_autograd(name: str) -> None:
    xs = [-2.5, -1.1, -0.4, -0.15, -1e-3, 0.0, 2e-3, 0.12, 0.45, 1.3, 2.2]
    for adv in (1.0, -1.0):
        grad = per_token_grad(name, xs, adv)
        mult = get_loss(name).multiplier(torch.tensor(xs, dtype=F64), torch.full((len(xs),), adv, dtype=F64))
        assert (-grad / adv).tolist() == pytest.approx(mult.tolist(), rel=1e-10, abs=1e-12), name


def frozen_reference(name: str, lp: torch.Tensor, lp0: torch.Tensor, old: torch.Tensor, adv, mask):
    """The objective with its stop-gradient terms frozen at the base point `lp0`, in plain torch ops.

    Finite differences of this function are the gradient the stop-gradient objective
    prescribes: zeta (MHPO) and the truncated IS weight (CISPO) held constant.
    """
    x = torch.where(mask, lp - old, 0.0)
    x0, a = torch.where(mask, lp0 - old, 0.0), adv.unsqueeze(-1)
    if name == "mhpo":
        zeta = (torch.nn.functional.softplus(1.5 * torch.tanh(x0 / 1.5))) ** 1.5
        zeta = zeta + (torch.nn.functional.softplus(-1.5 * torch.tanh(x0 / 1.5)) / 0.8) ** 2
        per_token = -torch.exp(1.5 * torch.tanh(x / 1.5) - zeta) * a
    else:
        per_token = -torch.exp(x0).clamp(max=6.0) * a * torch.where(mask, lp, 0.0)
    return aggregate(per_token, mask, get_loss(name).default_agg)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name: str) -> None:
    torch.manual_seed(0)
    # Points away from the clip edges (|x| not near log(1 +- eps)), where the losses are smooth.
    x = torch.tensor([[0.01, -0.05, 0.9, -0.7], [0.02, 0.6, -1.2, 0.0]], dtype=F64)
    old = torch.randn(2, 4, dtype=F64)
    adv = torch.tensor([0.7, -1.3], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])

    lp0 = old + x

    def fn(lp: torch.Tensor) -> torch.Tensor:
        loss = get_loss(name)(lp, old, adv, mask).loss
        if name in {"mhpo", "cispo"}:
            # Value of the frozen reference, gradient of the loss under test: gradcheck then
            # compares our backward with finite differences of the stop-gradient objective.
            return loss + (frozen_reference(name, lp, lp0, old, adv, mask) - loss).detach()
        return loss

    assert torch.autograd.gradcheck(fn, lp0.clone().requires_grad_(True))


# ---------------------------------------------------------------- numerics and masking


def test_mhpo_is_finite_at_infinite_ratios_and_nan_is_not_hidden() -> None:
    lp, old, a, m = tokens([math.inf, -math.inf, 0.5], -1.0)
    old[0, 0], old[1, 0] = -math.inf, math.inf  # x = +inf and -inf from the log-probs themselves
    out = get_loss("mhpo")(lp, old, a, m)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and torch.isfinite(lp.grad).all()
    assert lp.grad[:2].abs().sum().item() == 0.0
    lp2, old2, a2, m2 = tokens([math.nan, 0.1], 1.0)
    assert math.isnan(get_loss("mhpo")(lp2, old2, a2, m2).loss.item())


def test_bf16_inputs_are_computed_in_float32() -> None:
    torch.manual_seed(0)
    lp = (torch.randn(4, 16) * 0.1 - 2).bfloat16().requires_grad_(True)
    old = (lp.detach().float() + torch.randn(4, 16) * 0.1).bfloat16()
    adv, mask = torch.randn(4), torch.ones(4, 16, dtype=torch.bool)
    for name in NAMES:
        out = get_loss(name)(lp, old, adv, mask)
        ref = get_loss(name)(lp.detach().float(), old.float(), adv, mask)
        assert out.loss.dtype == torch.float32
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6, abs=1e-7)
        out.loss.backward()
        assert lp.grad.dtype == torch.bfloat16


finite = st.floats(-50, 50, allow_nan=False)
junk = st.sampled_from([math.inf, -math.inf, math.nan, 1e30, -1e30, 0.0])


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    xs=st.lists(st.floats(-3, 3), min_size=6, max_size=6),
    mask_bits=st.lists(st.booleans(), min_size=6, max_size=6),
    junk_lp=st.lists(junk, min_size=6, max_size=6),
    junk_adv=st.lists(junk, min_size=6, max_size=6),
    agg=st.sampled_from(AGGREGATIONS),
)
def test_masked_values_change_nothing(name, xs, mask_bits, junk_lp, junk_adv, agg) -> None:
    mask = torch.tensor(mask_bits).reshape(2, 3)
    x = torch.tensor(xs, dtype=F64).reshape(2, 3)
    adv = torch.tensor([[0.5, 0.5, 0.5], [-1.0, -1.0, -1.0]], dtype=F64)

    def run(lp_fill: torch.Tensor, adv_fill: torch.Tensor) -> tuple[float, list]:
        lp0 = torch.full((2, 3), -1.0, dtype=F64)
        lp = torch.where(mask, lp0, lp_fill).requires_grad_(True)
        old = torch.where(mask, lp0 - x, lp_fill - 1.0)
        out = get_loss(name)(lp, old, torch.where(mask, adv, adv_fill), mask, agg=agg)
        out.loss.backward()
        return out.loss.item(), lp.grad.tolist()

    clean = run(torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64))
    dirty = run(torch.tensor(junk_lp, dtype=F64).reshape(2, 3), torch.tensor(junk_adv, dtype=F64).reshape(2, 3))
    assert dirty == clean


@settings(max_examples=200, deadline=None)
@given(x=st.one_of(st.floats(allow_nan=False), st.sampled_from([math.inf, -math.inf])), c=st.floats(0.2, 5.0))
def test_mhpo_multiplier_bounded_by_exp_c(x: float, c: float) -> None:
    for dtype in (torch.float32, F64):
        m = get_loss("mhpo").multiplier(torch.tensor([x], dtype=dtype), torch.ones(1, dtype=dtype), c=c).item()
        assert 0.0 <= m <= math.exp(c) * (1 + 1e-6)
    m64 = get_loss("mhpo").multiplier(torch.tensor([x], dtype=F64), torch.ones(1, dtype=F64), c=c).item()
    if abs(x) < 30 * c:
        assert m64 > 0.0  # zero only in the limit |x| -> inf
    if math.isinf(x):
        assert m64 == 0.0


@settings(max_examples=100, deadline=None)
@given(x=st.floats(-6, 6), eps=st.floats(0.05, 0.5))
def test_grpo_multiplier_exactly_zero_outside_the_clip(x: float, eps: float) -> None:
    r = math.exp(x)
    for adv in (1.0, -1.0):
        grad = per_token_grad("grpo", [x], adv, eps=eps).item()
        outside = r > 1 + eps if adv > 0 else r < 1 - eps
        on_edge = min(abs(r - 1 - eps), abs(r - 1 + eps)) < 1e-9
        if outside:
            assert grad == 0.0
        elif not on_edge:
            assert grad == pytest.approx(-adv * r, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(tau_pos=st.floats(0.1, 10), tau_neg=st.floats(0.1, 10), adv=st.sampled_from([1.0, -1.0]))
def test_sapo_weight_is_one_at_ratio_one(tau_pos: float, tau_neg: float, adv: float) -> None:
    grad = per_token_grad("sapo", [0.0], adv, tau_pos=tau_pos, tau_neg=tau_neg).item()
    assert -grad / adv == pytest.approx(1.0, rel=1e-12)


def test_loss_stats_are_detached_and_shaped() -> None:
    lp, old, a, m = tokens([0.1, -0.2, 0.3], 1.0)
    out = get_loss("mhpo")(lp.reshape(1, 3), old.reshape(1, 3), a[:1], m.reshape(1, 3))
    assert out.loss.requires_grad and out.loss.shape == ()
    assert all(not t.requires_grad for t in out.stats.values())
    assert {k: tuple(v.shape) for k, v in out.stats.items()} == {
        "psi": (1, 3), "zeta": (1, 3), "zeta_pos": (1, 3), "zeta_neg": (1, 3), "multiplier": (1, 3), "loss": (),
    }  # fmt: skip
