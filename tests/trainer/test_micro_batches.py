"""Gradient accumulation in the trainer: micro-batches change neither the loss nor the gradient."""

from __future__ import annotations

import pytest

from mhpo.losses import AGGREGATIONS
from mhpo.trainer import Trainer
from tests.trainer.helpers import small_config


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_micro_batches_match_the_whole_mini_batch(agg: str) -> None:
    """Same seed, same rollout; one mini-batch of 16 sequences in one piece or in micro-batches of 3."""
    records = []
    for micro in (0, 3):
        trainer = Trainer(small_config(loss="dapo", agg=agg, mini_batches=1, micro_batch_size=micro, max_new_tokens=6))
        try:
            records.append(trainer.step())
        finally:
            trainer.close()
    lengths = {r["scalars"]["policy/length_mean"] for r in records[0]}
    assert lengths, "no record"
    for whole, split in zip(*records, strict=True):
        assert split["scalars"]["train/loss"] == pytest.approx(whole["scalars"]["train/loss"], rel=1e-4, abs=1e-6)
        assert split["scalars"]["grad/norm"] == pytest.approx(whole["scalars"]["grad/norm"], rel=1e-4)
