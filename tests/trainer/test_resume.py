"""`mhpo train --resume latest` after a SIGKILL past the checkpoint: the run's history is the
checkpointed trajectory plus the resumed one, never a mix, never a hole, and the resumed process
trains with the checkpoint's options (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mhpo.trainer import Trainer
from mhpo.trainer.cli import parse_config
from tests.fixtures.server import REPO_ROOT, LiveServer
from tests.trainer.helpers import small_config

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


KILLED_AFTER_CHECKPOINT = """
import os, signal, sys
import mhpo
from mhpo.trainer import Trainer
from tests.trainer.helpers import small_config
url, ckpt = sys.argv[1:3]
run = mhpo.init("t", "persist", server=url, flush_interval=3600.0)  # no batch falls due on its own
t = Trainer(small_config(stream=True, checkpoint_dir=ckpt), run=run)
t.step()
t.save_checkpoint()
print(run.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_checkpoint_is_written_only_once_the_run_holds_its_steps(live_server_db: LiveServer, tmp_path: Path) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_CHECKPOINT, live_server_db.url, str(tmp_path / "ckpt")],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "ckpt" / "step-1").is_dir()
    run_id = killed.stdout.split()[-1]
    series = httpx.get(f"{live_server_db.url}/api/v1/runs/{run_id}/scalars", params={"keys": "train/loss"}).json()
    assert series["series"]["train/loss"]["step"] == [0, 1]


def test_resume_restores_the_checkpoints_options_and_names_each_override(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = str(tmp_path / "ckpt")
    Trainer(small_config(loss="dapo", hparams={"eps_high": 0.3}, temperature=0.9, steps=1, checkpoint_dir=ckpt)).train()
    (tmp_path / "run.yaml").write_text("group_size: 8\n")

    with caplog.at_level(logging.WARNING, logger="mhpo"):
        restored = parse_config(["--checkpoint-dir", ckpt, "--resume", "latest"])
    assert (restored.loss, restored.hparams, restored.temperature) == ("dapo", {"eps_high": 0.3}, 0.9)
    assert (restored.prompts_per_step, restored.group_size, restored.max_new_tokens) == (4, 4, 4)
    assert (restored.stream, restored.progress, restored.resume) == (False, False, "latest")
    assert not caplog.records

    overridden = parse_config(
        [
            "--checkpoint-dir",
            ckpt,
            "--resume",
            "latest",
            "--config",
            str(tmp_path / "run.yaml"),
            "--temperature",
            "0.5",
            "--hparam",
            "eps_low=0.1",
            "--steps",
            "3",
            "--seed",
            "0",
        ]
    )
    assert (overridden.loss, overridden.temperature, overridden.steps) == ("dapo", 0.5, 3)
    assert (overridden.group_size, overridden.hparams) == (8, {"eps_high": 0.3, "eps_low": 0.1})
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "step-1" in warning.getMessage()
    changes = warning.getMessage().split(": ", 1)[1].split("; ")
    assert changes == [
        "group_size 4 -> 8",
        "hparams {'eps_high': 0.3} -> {'eps_high': 0.3, 'eps_low': 0.1}",
        "steps 1 -> 3",
        "temperature 0.9 -> 0.5",
    ]  # seed 0 was given but did not change


def stored_series(url: str, run_id: str, key: str) -> dict[int, float]:
    series = httpx.get(f"{url}/api/v1/runs/{run_id}/scalars", params={"keys": key}).json()["series"][key]
    assert len(series["step"]) == len(set(series["step"]))
    return dict(zip(series["step"], series["value"], strict=True))


def test_a_killed_dapo_run_resumed_with_resume_latest_alone(live_server_db: LiveServer, tmp_path: Path) -> None:
    """The must-show case: SIGKILL right after a checkpoint, `--resume latest` with no other option."""
    ckpt = tmp_path / "ckpt"
    train = [sys.executable, "-m", "mhpo", "train"]
    first = subprocess.Popen(
        [
            *train,
            *SMALL,
            "--loss",
            "dapo",
            "--steps",
            "4",
            "--checkpoint-dir",
            str(ckpt),
            "--checkpoint-every",
            "2",
            "--server",
            live_server_db.url,
            "--project",
            "t",
            "--name",
            "dapo-kill",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (ckpt / "step-2").is_dir():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    (run,) = httpx.get(f"{live_server_db.url}/api/v1/runs").json()["runs"]
    assert run["status"] == "running"

    resumed = subprocess.run(
        [*train, "--checkpoint-dir", str(ckpt), "--resume", "latest"],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "differ from the checkpoint" not in resumed.stderr
    url, run_id = live_server_db.url, run["run_id"]
    steps = list(range(8))  # 4 rollouts x 2 optimizer steps
    for key in ("train/loss", "grad/norm", "reward/mean", "grad/multiplier_mean"):
        assert sorted(stored_series(url, run_id, key)) == steps, key
    multiplier = stored_series(url, run_id, "grad/multiplier_mean")
    # dapo's multiplier is r inside its trust region (~1); MHPO's would be exp(-zeta) = 0.265 at r = 1
    assert all(multiplier[s] > 0.5 for s in steps), multiplier
    stored = httpx.get(f"{url}/api/v1/runs/{run_id}").json()
    assert (stored["loss"], stored["status"], stored["last_step"]) == ("dapo", "finished", 7)
    assert stored["config"]["loss"] == "dapo"
