"""Empty steps (no valid token) and zero-size inputs: token counts of 0, no NaN, nothing that needs a token."""

from __future__ import annotations

import math

import pytest
import torch

from mhpo.diagnostics import DiagnosticsAccumulator, compute_step_stats


@pytest.mark.parametrize("shape", [(4, 6), (0, 6), (4, 0), (0, 0)])
@pytest.mark.parametrize("loss", ["mhpo", "grpo", "cispo"])
def test_an_empty_step_streams_a_token_count_of_zero_and_no_nan(shape: tuple[int, int], loss: str) -> None:
    b, t = shape
    logp = torch.randn(b, t)
    stats = compute_step_stats(
        loss,
        logp,
        logp - 0.1,
        torch.randn(b),
        torch.zeros(b, t, dtype=torch.bool),
        entropy=torch.rand(b, t),
        token_ids=torch.zeros(b, t, dtype=torch.long),
    )
    assert stats.scalars == {"tokens/valid": 0.0}
    assert stats.histograms == {} and stats.outliers == []


def test_an_empty_micro_batch_changes_nothing_in_a_step() -> None:
    torch.manual_seed(0)
    logp, old = torch.randn(3, 5) * 0.1, torch.zeros(3, 5)
    adv, mask = torch.randn(3), torch.ones(3, 5, dtype=torch.bool)
    alone = DiagnosticsAccumulator("mhpo")
    alone.update(logp, old, adv, mask)
    mixed = DiagnosticsAccumulator("mhpo")
    mixed.update(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0), torch.zeros(0, 5, dtype=torch.bool))
    mixed.update(logp, old, adv, mask)
    mixed.update(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2), torch.zeros(2, 0, dtype=torch.bool))
    a, m = alone.compute().scalars, mixed.compute().scalars
    assert a["tokens/valid"] == m["tokens/valid"] == 15.0
    assert a["policy/length_mean"] == 5.0 and m["policy/length_mean"] == 3.0  # two more sequences, no token
    for key in a:
        if key != "policy/length_mean":
            assert m[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    assert all(math.isfinite(v) for v in m.values())
