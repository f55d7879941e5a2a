"""A run driven too hard (GRPO, lr 2e-3, 2 epochs x 4 mini-batches per rollout) is flagged in its first rollout.

This regime fails within its first 2-6 rollouts (reward to 0, entropy under a quarter of
its start; `bench/early_warning.py`), before any rolling baseline exists: the warm-up-free
`trust_region` bounds are what catch it, on the records of the real trainer streamed to a
real server.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from mhpo.demo import demo_configs
from mhpo.trainer import Trainer
from tests.fixtures.server import LiveServer


@pytest.mark.timeout(600)
def test_too_many_updates_per_rollout_raise_trust_region_in_the_first_rollout(live_server: LiveServer) -> None:
    demo = demo_configs(steps=2, seed=0, task="addition", project="hard", server=live_server.url, progress=False)[1]
    config = dataclasses.replace(demo, prompts_per_step=8, lr=2e-3, ppo_epochs=2, mini_batches=4, name="too-hard")
    trainer = Trainer(config)
    run_id = trainer.run.id
    trainer.train()
    events = httpx.get(f"{live_server.url}/api/v1/runs/{run_id}/events").json()["events"]
    region = [e for e in events if e["type"] == "flag" and e["kind"] == "trust_region"]
    assert region, [e["message"] for e in events]
    first = region[0]
    assert first["step"] < 8 and first["severity"] in ("warning", "critical"), first
    assert first["detector"] == "bound" and first["evidence"]["signals"][0]["key"] in (
        "ratio/clip_frac",
        "grad/update_ratio",
    )
