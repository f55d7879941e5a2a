"""A healthy run of the real trainer with the demo's defaults, streamed to a real server, raises no alarm."""

from __future__ import annotations

import httpx
import pytest

from mhpo.demo import demo_configs
from mhpo.trainer import Trainer
from tests.fixtures.server import LiveServer


@pytest.mark.timeout(900)  # 60 optimizer steps of real training: minutes on a shared 2-core machine
def test_demo_defaults_raise_no_warning_and_stream_the_step_kind(live_server: LiveServer) -> None:
    config = demo_configs(steps=30, seed=0, task="addition", project="quiet", server=live_server.url, progress=False)[0]
    trainer = Trainer(config)
    run_id = trainer.run.id
    trainer.train()
    api = f"{live_server.url}/api/v1/runs/{run_id}"
    series = httpx.get(f"{api}/scalars", params={"keys": "train/update_index,tokens/valid"}).json()["series"]
    assert series["train/update_index"]["value"][:4] == [0.0, 1.0, 0.0, 1.0]
    assert min(series["tokens/valid"]["value"]) > 0
    events = httpx.get(f"{api}/events").json()["events"]
    alarms = [e for e in events if e["type"] == "flag" and e["severity"] in ("warning", "critical")]
    assert not alarms, [e["message"] for e in alarms]
    assert len(series["tokens/valid"]["step"]) == 60
