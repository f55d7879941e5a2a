"""`torchrun --nproc-per-node 2 -m mhpo train` on CPU (gloo): one merged record per step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import REPO_ROOT, LiveServer, free_port


def test_two_process_torchrun_sends_one_merged_record_per_step(live_server: LiveServer, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun not found next to the interpreter; torch installs it")
    metrics = tmp_path / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "mhpo",
            "train",
            "--prompts-per-step",
            "4",
            "--group-size",
            "4",
            "--max-new-tokens",
            "4",
            "--steps",
            "2",
            "--server",
            live_server.url,
            "--project",
            "ddp",
            "--name",
            "two-ranks",
            "--no-progress",
            "--metrics-file",
            str(metrics),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "ckpt" / "step-2" / "rng-rank1.pt").exists()  # every rank agreed the run held its steps
    merged = [json.loads(line) for line in metrics.read_text().splitlines()]
    ranks = [[json.loads(line) for line in Path(f"{metrics}.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert [r["step"] for r in merged] == [0, 1, 2, 3]
    for step, record in enumerate(merged):
        local = [ranks[r][step]["local"] for r in (0, 1)]
        tokens = [lo["tokens"] for lo in local]
        assert all(n > 0 for n in tokens)
        for key in ("log_ratio", "zeta", "multiplier"):
            h = record["histograms"][key]
            assert sum(h["counts"]) + h["underflow"] + h["overflow"] == sum(tokens), key
        h = record["histograms"]["log_ratio"]
        a, b = (lo["log_ratio"] for lo in local)
        assert h["counts"] == [x + y for x, y in zip(a["counts"], b["counts"], strict=True)]  # bin by bin
        assert (h["underflow"], h["overflow"]) == (a["underflow"] + b["underflow"], a["overflow"] + b["overflow"])
        # every rank holds the same reduced statistics
        assert ranks[0][step]["scalars"] == ranks[1][step]["scalars"] == record["scalars"]

    runs = httpx.get(f"{live_server.url}/api/v1/runs", params={"project": "ddp"}).json()["runs"]
    assert len(runs) == 1 and runs[0]["last_step"] == 3  # only rank 0 created a run and sent
    api = f"{live_server.url}/api/v1/runs/{runs[0]['run_id']}"
    stored = httpx.get(f"{api}/histograms/log_ratio").json()
    assert stored["step"] == [0, 1, 2, 3]
    for i, record in enumerate(merged):
        assert stored["counts"][i] == record["histograms"]["log_ratio"]["counts"]
