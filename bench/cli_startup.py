"""How fast the command line answers `--help`, and whether it loaded torch or transformers to do so.

Each command runs in a fresh interpreter (`python -m mhpo ... --help`), `--repeat` times; the
median wall time is printed with the heavy modules the process imported (found by running the
same command under `python -X importtime`). The goal is well under a second, with no torch.

    python bench/cli_startup.py
    python bench/cli_startup.py --repeat 9
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["train", "--help"], ["demo", "--help"], ["serve", "--help"])
HEAVY = ("torch", "transformers", "trl")


def heavy_imports(argv: list[str]) -> list[str]:
    """The HEAVY top-level modules `mhpo <argv>` imports (from `-X importtime`'s report)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mhpo", *argv],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def wall_time(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mhpo", *argv], cwd=REPO_ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (default 5)")
    opts = parser.parse_args(args)
    print(f"{'command':<22} {'median s':>9} {'min s':>7}  heavy imports")
    for argv in COMMANDS:
        times = [wall_time(argv) for _ in range(opts.repeat)]
        heavy = ", ".join(heavy_imports(argv)) or "none"
        print(f"{'mhpo ' + ' '.join(argv):<22} {statistics.median(times):>9.3f} {min(times):>7.3f}  {heavy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
