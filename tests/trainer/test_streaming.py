"""Training streamed into a real `mhpo serve`: every optimizer step arrives, ratios move."""

from __future__ import annotations

import subprocess
import sys

import httpx

from mhpo.trainer import Trainer
from tests.fixtures.server import REPO_ROOT, LiveServer
from tests.trainer.helpers import small_config


def test_records_arrive_in_a_live_server(live_server: LiveServer) -> None:
    trainer = Trainer(small_config(steps=2, stream=True, server=live_server.url, project="t", name="stream"))
    run_id = trainer.run.id
    trainer.train()  # finishes the run: flushes every record
    api = f"{live_server.url}/api/v1/runs/{run_id}"
    run = httpx.get(api).json()
    assert (run["status"], run["last_step"], run["loss"]) == ("finished", 3, "mhpo")
    keys = httpx.get(f"{api}/keys").json()
    assert {"ratio/std", "grad/norm/attention", "reward/mean", "train/lr"} <= set(keys["scalars"])
    assert {"log_ratio", "zeta", "multiplier"} <= set(keys["histograms"])
    series = httpx.get(f"{api}/scalars", params={"keys": "ratio/std"}).json()["series"]["ratio/std"]
    assert series["step"] == [0, 1, 2, 3]
    assert series["value"][1] > 0 and series["value"][3] > 0  # the second mini-batch of each rollout
    outliers = httpx.get(f"{api}/outliers", params={"step": 3}).json()["outliers"]
    assert outliers and all(o["text"] for o in outliers if o["token_id"] is not None)


def test_mhpo_train_command_streams(live_server: LiveServer, tmp_path) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("prompts_per_step: 4\ngroup_size: 4\nmax_new_tokens: 4\nsteps: 5\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mhpo",
            "train",
            "--config",
            str(cfg),
            "--steps",
            "1",
            "--loss",
            "dapo",
            "--server",
            live_server.url,
            "--project",
            "cli",
            "--name",
            "from-cli",
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    runs = httpx.get(f"{live_server.url}/api/v1/runs", params={"project": "cli"}).json()["runs"]
    assert [(r["name"], r["loss"], r["last_step"], r["status"]) for r in runs] == [("from-cli", "dapo", 1, "finished")]
