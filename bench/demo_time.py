"""How long `mhpo demo` takes to say where to look, to get the model ready, and to finish.

Runs `mhpo demo --no-serve --no-progress` in a subprocess on a fresh temporary SQLite file and
prints each line it says with the seconds elapsed since the command started, then a summary:
when the dashboard URL came, when the tiny model was ready, when both runs were done, and the
machine's load average before and after (a loaded machine makes every figure an upper bound).
`--cold` also gives it an empty model cache, so the tiny model is built and warmed up.

    python bench/demo_time.py              # model cache as it is (built by an earlier demo)
    python bench/demo_time.py --cold       # first use
    python bench/demo_time.py --steps 5    # shorter runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MILESTONES = {"dashboard URL": "dashboard: http", "tiny model ready": "tiny model ready", "runs done": "runs done in"}


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="rollout steps per run (default 30, the demo's own)")
    parser.add_argument("--cold", action="store_true", help="an empty model cache: build the tiny model")
    parser.add_argument("--port", type=int, default=18765, help="server port (default 18765)")
    opts = parser.parse_args(args)
    work = Path(tempfile.mkdtemp(prefix="mhpo-demo-time-"))
    env = {**os.environ, "XDG_DATA_HOME": str(work / "data")}
    if opts.cold:
        env["MHPO_CACHE_DIR"] = str(work / "cache")
    command = [sys.executable, "-m", "mhpo", "demo", "--no-serve", "--no-progress", "--steps", str(opts.steps)]
    command += ["--port", str(opts.port)]
    load_before = os.getloadavg()
    started = time.monotonic()
    seen: dict[str, float] = {}
    with subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            elapsed = time.monotonic() - started
            print(f"{elapsed:7.1f} s  {line.rstrip()}", flush=True)
            for name, marker in MILESTONES.items():
                if marker in line and name not in seen:
                    seen[name] = elapsed
    total = time.monotonic() - started
    load_after = os.getloadavg()
    print(f"\n{'cold' if opts.cold else 'warm'} model cache, {opts.steps} steps per run, exit code {proc.returncode}")
    for name in MILESTONES:
        print(f"{name:<18} {seen.get(name, float('nan')):7.1f} s")
    print(f"{'whole command':<18} {total:7.1f} s")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
