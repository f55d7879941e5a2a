"""mhpo.curves: the multiplier curves the dashboard draws, and the clip bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mhpo.curves import clip_bounds, multiplier


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
