"""`mhpo train --resume latest` after a SIGKILL past the checkpoint: the run's history is the
checkpointed trajectory plus the resumed one, never a mix (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.fixtures.server import REPO_ROOT, LiveServer

SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "4", "--no-progress"]
KILLED = """
import os, signal, sys
from mhpo.trainer import Trainer
from tests.trainer.helpers import small_config
url, ckpt, metrics = sys.argv[1:4]
t = Trainer(small_config(steps=10, stream=True, server=url, project="t", name="resume", checkpoint_dir=ckpt,
                         metrics_file=metrics))
t.step()
t.save_checkpoint()  # step-1: optimizer steps 0 and 1
t.step()
t.step()  # optimizer steps 2..5, past the checkpoint
assert t.run.flush(timeout=60)
print(t.run.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def logged(path: Path, key: str) -> dict[int, float]:
    return {r["step"]: r["scalars"][key] for r in map(json.loads, path.read_text().splitlines())}


def test_resume_latest_after_a_kill_past_the_checkpoint(live_server_db: LiveServer, tmp_path: Path) -> None:
    ckpt, first, second = tmp_path / "ckpt", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, live_server_db.url, str(ckpt), str(first)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_id = killed.stdout.split()[-1]
    api = f"{live_server_db.url}/api/v1/runs/{run_id}"
    assert httpx.get(api).json()["last_step"] == 5
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1"]

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mhpo",
            "train",
            *SMALL,
            "--steps",
            "3",
            "--checkpoint-dir",
            str(ckpt),
            "--resume",
            "latest",
            "--temperature",
            "0.7",
            "--server",
            live_server_db.url,
            "--project",
            "t",
            "--name",
            "resume",
            "--metrics-file",
            str(second),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    for key in ("train/loss", "grad/norm", "reward/mean"):
        series = httpx.get(f"{api}/scalars", params={"keys": key}).json()["series"][key]
        stored = dict(zip(series["step"], series["value"], strict=True))
        old, new = logged(first, key), logged(second, key)
        assert sorted(new) == [2, 3, 4, 5]
        assert stored == {**{s: old[s] for s in (0, 1)}, **new}
    assert any(logged(first, "train/loss")[s] != logged(second, "train/loss")[s] for s in range(2, 6))
    run = httpx.get(api).json()
    assert (run["status"], run["last_step"]) == ("finished", 5)
    rewinds = [e for e in httpx.get(f"{api}/events").json()["events"] if e["type"] == "rewind"]
    assert [(e["step"], e["evidence"]["previous_last_step"]) for e in rewinds] == [(1, 5)]
