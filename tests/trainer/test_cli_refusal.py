"""`mhpo train` against a server that refuses its token: one line on stderr, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures.server import REPO_ROOT, LiveServer


def test_a_refused_token_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = {"MHPO_AUTH": "true", "XDG_DATA_HOME": str(tmp_path)}
    with LiveServer(f"sqlite:///{tmp_path / 'mhpo.db'}", env=env) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "mhpo", "train", "--steps", "1", "--server", server.url, "--no-progress"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "MHPO_TOKEN": "mhpo_not-a-token", "PYTHONPATH": str(REPO_ROOT)},
        )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    refusal = [line for line in proc.stderr.splitlines() if line.startswith("mhpo train:")]
    assert len(refusal) == 1 and "401" in refusal[0], proc.stderr
    assert "httpx" not in proc.stderr
