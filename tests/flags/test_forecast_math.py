"""The shortcuts the state detectors take at every point give what the full computation gives."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mhpo_server.monitoring import DEFAULT_PARAMS
from mhpo_server.monitoring.forecast import entropy_forecast, may_be_confident, recent_level, reference_level

FORECAST = DEFAULT_PARAMS.collapse.forecast
# Entropy-like series: a level, a drift that may steepen half-way, and noise; some of them collapse.
series = st.builds(
    lambda n, start, slope, steepen, noise, seed: (
        start
        + slope * np.arange(n) * np.where(np.arange(n) > n // 2, steepen, 1.0)
        + noise * np.random.default_rng(seed).standard_normal(n)
    ),
    st.integers(40, 140),
    st.floats(0.5, 2.0),
    st.floats(-0.02, 0.005),
    st.floats(1.0, 8.0),
    st.floats(0.0, 0.05),
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=60, deadline=None)
@given(series)
def test_a_confident_forecast_passes_the_cheap_test_first(values: np.ndarray) -> None:
    steps = np.arange(len(values), dtype=np.int64) * 8
    reference = reference_level(values, FORECAST.reference_points)
    assert reference is not None
    assert all(may_be_confident(values, end, reference, FORECAST) for end in confident_ends(steps, values, reference))


def confident_ends(steps: np.ndarray, values: np.ndarray, reference: float) -> list[int]:
    out = []
    for end in range(1, len(values) + 1):
        forecast = entropy_forecast(steps, values, end, reference, FORECAST)
        if forecast is not None and forecast.confident:
            out.append(end)
    return out


def test_a_collapse_breaking_from_a_stable_stretch_is_forecast_and_passes_the_cheap_test() -> None:
    """The property above is not vacuous: this series has confident forecasts."""
    values = np.concatenate([np.full(60, 1.2), np.geomspace(1.2, 0.05, 60)])
    values += 0.005 * np.random.default_rng(0).standard_normal(len(values))
    steps = np.arange(len(values), dtype=np.int64)
    reference = reference_level(values, FORECAST.reference_points)
    assert reference is not None
    ends = confident_ends(steps, values, reference)
    assert ends
    assert all(may_be_confident(values, end, reference, FORECAST) for end in ends)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=12), st.integers(1, 12))
def test_the_recent_level_is_numpys_median(values: list[float], points: int) -> None:
    array = np.array(values)
    end = len(values)
    assert recent_level(array, end, points) == float(np.median(array[max(0, end - points) : end]))
