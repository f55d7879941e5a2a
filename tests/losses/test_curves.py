"""mhpo.curves: the multiplier curves the dashboard draws, and the clip bounds."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mhpo.curves import MULTIPLIERS, clip_bounds, multiplier
from mhpo.loss_specs import SPECS
from mhpo.losses import LOSSES, get_loss

F64 = torch.float64


def test_mhpo_curve_matches_the_formula_and_is_sign_free() -> None:
    x = np.array([-np.inf, -2.0, 0.0, 0.5, np.inf])
    psi = 1.5 * np.tanh(x / 1.5)
    zeta = np.log1p(np.exp(psi)) ** 1.5 + (np.log1p(np.exp(-psi)) / 0.8) ** 2
    expected = np.exp(psi - zeta) / np.cosh(x / 1.5) ** 2
    got = multiplier("mhpo", x, +1)
    assert got.dtype == np.float64 and got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_array_equal(multiplier("mhpo", x, -1), got)
    assert multiplier("mhpo", [0.5], 1, c=2.0)[0] != pytest.approx(got[3])


def test_grpo_curve_is_r_inside_and_zero_on_the_clipped_side() -> None:
    x = np.log([0.5, 0.9, 1.1, 1.5])
    np.testing.assert_allclose(multiplier("grpo", x, 1), [0.5, 0.9, 1.1, 0.0])
    np.testing.assert_allclose(multiplier("grpo", x, -1), [0.0, 0.9, 1.1, 1.5])
    np.testing.assert_allclose(multiplier("dapo", np.log([1.25]), 1), [1.25])
    np.testing.assert_allclose(multiplier("dual_clip", np.log([2.0, 4.0]), -1), [2.0, 0.0])
    np.testing.assert_allclose(multiplier("cispo", np.log([0.1, 10.0]), 1), [0.1, 6.0])
    assert multiplier("sapo", [0.0], -1)[0] == pytest.approx(1.0)


def test_clip_bounds() -> None:
    assert clip_bounds("grpo") == pytest.approx((math.log(0.8), math.log(1.2)))
    assert clip_bounds("dapo", eps_high=0.3) == pytest.approx((math.log(0.8), math.log(1.3)))
    assert clip_bounds("gspo") == pytest.approx((math.log(1 - 3e-4), math.log(1 + 4e-4)))
    assert clip_bounds("cispo") == (-math.inf, pytest.approx(math.log(6.0)))
    assert clip_bounds("mhpo") is None and clip_bounds("sapo") is None


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="adv_sign=0 must be a non-zero number"):
        multiplier("grpo", [0.0], 0)
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        multiplier("ppo", [0.0], 1)
    with pytest.raises(ValueError, match="unknown hyper-parameter eps_high for loss 'grpo'"):
        clip_bounds("grpo", eps_high=0.3)


# ------------------------------------------------- numpy curves == the torch losses' own multipliers

FINITE_OR_NOT = st.one_of(st.floats(-60.0, 60.0), st.sampled_from([math.inf, -math.inf, math.nan]))


def _pos(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def _or_default(default: float, strategy: st.SearchStrategy[float]) -> st.SearchStrategy[float]:
    """The paper's value (some take a special code path, e.g. k = 1.5 or 2) or a random one."""
    return st.one_of(st.just(default), strategy)


@st.composite
def _dual_clip_hparams(draw: st.DrawFn) -> dict[str, float]:
    eps = draw(_pos(0.01, 0.9))
    return {"eps": eps, "clip_c": 1.0 + eps + draw(_pos(1e-3, 10.0))}


HPARAMS: dict[str, st.SearchStrategy[dict[str, float | None]]] = {
    "mhpo": st.fixed_dictionaries(
        {
            "c": _or_default(1.5, _pos(0.05, 15.0)),
            "k_pos": _or_default(1.5, _pos(0.2, 4.0)),
            "lambda_pos": _or_default(1.0, _pos(0.05, 5.0)),
            "k_neg": _or_default(2.0, _pos(0.2, 4.0)),
            "lambda_neg": _or_default(0.8, _pos(0.05, 5.0)),
        }
    ),
    "grpo": st.fixed_dictionaries({"eps": _pos(1e-4, 0.99)}),
    "dapo": st.fixed_dictionaries({"eps_low": _pos(1e-4, 0.99), "eps_high": _pos(1e-4, 10.0)}),
    "dual_clip": _dual_clip_hparams(),
    "gspo": st.fixed_dictionaries({"eps_low": _pos(1e-5, 0.99), "eps_high": _pos(1e-5, 1.0)}),
    "sapo": st.fixed_dictionaries({"tau_pos": _pos(0.01, 20.0), "tau_neg": _pos(0.01, 20.0)}),
    "cispo": st.fixed_dictionaries({"eps_high": _pos(1e-3, 20.0), "eps_low": st.none() | _pos(1e-3, 0.99)}),
}


def test_every_registry_loss_has_a_numpy_curve_and_one_spec() -> None:
    assert list(MULTIPLIERS) == list(LOSSES) == list(SPECS) == list(HPARAMS)
    for name, loss in LOSSES.items():
        assert loss.spec is SPECS[name]


@pytest.mark.parametrize("name", list(HPARAMS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_numpy_curve_equals_the_torch_multiplier(name: str, data: st.DataObject) -> None:
    hp = data.draw(st.one_of(st.just({}), HPARAMS[name]), label="hparams")
    xs = np.asarray(data.draw(st.lists(FINITE_OR_NOT, min_size=1, max_size=24), label="x"), dtype=np.float64)
    for sign in (1.0, -1.0):
        expected = get_loss(name).multiplier(torch.from_numpy(xs), torch.full((len(xs),), sign, dtype=F64), **hp)
        got = multiplier(name, xs, sign, **hp)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-12, atol=1e-300, equal_nan=True)
    assert clip_bounds(name, **hp) == get_loss(name).clip_bounds(**hp)


def test_a_server_process_draws_curves_without_torch() -> None:
    """The curves, the specs, the dashboard's figures and the client load no torch."""
    code = (
        "import sys, numpy as np\n"
        "import mhpo, mhpo.client, mhpo.curves\n"
        "from mhpo_dashboard import figures\n"
        "h = {'step': [3], 'lo': -2.0, 'hi': 2.0, 'bins': 4, 'counts': [[1, 2, 3, 4]], 'underflow': [0], 'overflow': [1]}\n"
        "fig = figures.step_histogram_figure(h, h, 3, 'dapo', {'eps_high': 0.3})\n"
        "assert any(t.get('name') == 'M(x) dapo A>0' for t in fig['data'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
