"""Early warning on real `mhpo train` runs: the flags against the thresholds a TRL/verl user watches.

Trains real runs of the built-in tiny model on CPU, one after the other (`mhpo train
--no-stream --metrics-file`: the records exactly as they would be streamed), then runs the
service's detectors (`mhpo_server.monitoring.detect`, the code the ingest listener runs; batching
does not change its flags) on each run's records:

- healthy: the `mhpo demo` configuration (16 prompts x 8 completions, lr 5e-4, 2
  mini-batches), MHPO and GRPO, seeds 0-4;
- `many_updates`: GRPO, lr 2e-3, 2 epochs x 4 mini-batches per rollout, seeds 0-4;
- `lr_ramp`: GRPO, lr warmed up linearly to 6e-3 over 160 optimizer steps, seeds 0-4.

Each run is labelled by its own state, per rollout: it has failed from the first rollout
after which, for 3 rollouts in a row, the entropy stays under 25 % of its start (median of
the first 3 rollouts) or the reward (mean of the last 4 rollouts) stays under half its
running peak (once the peak exceeds 0.1). A run of a collapse regime that never fails is
reported as such; a healthy-configuration run that fails counts with the failures.

Per detector (flag kind) it reports the first warning or critical flag of each failed run
and its lead (label - first warning, in optimizer steps; > 0 is early), whether the run was
flagged no later than one rollout after its label, and the warning/critical flags per
1,000 optimizer steps of the runs that did not fail. The same for three threshold alarms
a TRL/verl user sets today (each crossing from the safe side counts once):
`entropy < 50 % of its start`, `clip fraction > 0.2`, `KL k3 > 0.1`.

    python bench/early_warning.py              # 10 healthy + 10 collapse-regime runs (3-15 minutes on 2 cores)
    python bench/early_warning.py --quick      # 1 seed per configuration, shorter runs
    python bench/early_warning.py --out DIR    # keep the metrics files (reused when present)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mhpo_server.monitoring import History, detect

DEMO = ["--prompts-per-step", "16", "--group-size", "8", "--lr", "5e-4"]
REGIMES: dict[str, tuple[list[str], int]] = {  # name -> (train flags, rollouts)
    "healthy_mhpo": (["--loss", "mhpo", *DEMO], 60),
    "healthy_grpo": (["--loss", "grpo", *DEMO], 60),
    "many_updates": (["--loss", "grpo", "--lr", "2e-3", "--ppo-epochs", "2", "--mini-batches", "4"], 60),
    "lr_ramp": (["--loss", "grpo", "--lr", "6e-3", "--lr-warmup-steps", "160"], 80),
}
THRESHOLDS = ("entropy<50%", "clip_frac>0.2", "kl_k3>0.1")
ALARM = ("warning", "critical")


@dataclass
class Run:
    regime: str
    seed: int
    records: list[dict]
    label: int | None = None  # optimizer step from which the run has failed
    label_rollout: int | None = None
    updates_per_rollout: int = 1
    first: dict[str, int] = field(default_factory=dict)  # detector or threshold -> first warning step
    alarms: dict[str, int] = field(default_factory=dict)  # detector or threshold -> count


def train(regime: str, seed: int, rollouts: int, out: Path, flags: list[str] | None = None) -> list[dict]:
    """The records of one `mhpo train` run of `regime` (its flags from REGIMES unless given), cached in `out`."""
    path = out / f"{regime}-s{seed}-r{rollouts}.jsonl"
    if not path.exists():
        flags = REGIMES[regime][0] if flags is None else flags
        partial = path.with_suffix(".part")
        partial.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "mhpo",
            "train",
            *flags,
            "--seed",
            str(seed),
            "--steps",
            str(rollouts),
            "--no-stream",
            "--no-progress",
            "--metrics-file",
            str(partial),
            "--name",
            f"{regime}-s{seed}",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        t0 = time.monotonic()
        subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True, capture_output=True)
        partial.rename(path)
        print(f"  trained {regime} seed {seed}: {rollouts} rollouts in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def by_rollout(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in records:
        out.setdefault(int(r["scalars"]["train/rollout"]), []).append(r)
    return out


def label(run: Run, hold: int = 3) -> None:
    """The first optimizer step from which the run's own state says it has failed (see the module docstring)."""
    rollouts = by_rollout(run.records)
    order = sorted(rollouts)
    run.updates_per_rollout = max(len(v) for v in rollouts.values())
    entropy = [rollouts[r][0]["scalars"]["policy/entropy"] for r in order]
    reward = [rollouts[r][0]["scalars"]["reward/mean"] for r in order]
    start = statistics.median(entropy[:3])
    peak, bad = 0.0, []
    for i in range(len(order)):
        smooth = statistics.fmean(reward[max(0, i - 3) : i + 1])
        peak = max(peak, smooth)
        bad.append(entropy[i] < 0.25 * start or (peak > 0.1 and smooth < 0.5 * peak))
    for i in range(len(order) - hold + 1):
        if all(bad[i : i + hold]):
            run.label_rollout = order[i]
            run.label = int(rollouts[order[i]][0]["step"])
            return


def thresholds(run: Run) -> dict[str, list[int]]:
    """Steps where each threshold alarm is crossed from the safe side."""
    rollouts = by_rollout(run.records)
    start = statistics.median([rollouts[r][0]["scalars"]["policy/entropy"] for r in sorted(rollouts)[:3]])
    tests = {
        "entropy<50%": lambda s: s.get("policy/entropy", start) < 0.5 * start,
        "clip_frac>0.2": lambda s: s.get("ratio/clip_frac", 0.0) > 0.2,
        "kl_k3>0.1": lambda s: s.get("policy/kl_k3", 0.0) > 0.1,
    }
    out: dict[str, list[int]] = {}
    for name, test in tests.items():
        above, steps = False, []
        for r in run.records:
            now = bool(test(r["scalars"]))
            if now and not above:
                steps.append(int(r["step"]))
            above = now
        out[name] = steps
    return out


def evaluate(run: Run) -> None:
    points: dict[str, dict[int, float]] = {}
    for r in run.records:
        for key, value in r["scalars"].items():
            points.setdefault(key, {})[int(r["step"])] = float(value)
    steps = [int(r["step"]) for r in run.records]
    flags = [f for f in detect(History(points), steps) if f.severity in ALARM]
    for name, found in [(f.kind, f.step) for f in flags] + [(k, s) for k, v in thresholds(run).items() for s in v]:
        run.alarms[name] = run.alarms.get(name, 0) + 1
        run.first[name] = min(run.first.get(name, found), found)
    if flags:
        run.alarms["any flag"] = len(flags)
        run.first["any flag"] = min(f.step for f in flags)


def report(runs: list[Run]) -> None:
    failed = [r for r in runs if r.label is not None]
    healthy = [r for r in runs if r.label is None]
    detectors = sorted({k for r in runs for k in r.first} - set(THRESHOLDS) - {"any flag"})
    columns = ["any flag", *detectors, *THRESHOLDS]
    print(f"\n{'run':<20}{'steps':>6}{'label':>7}  first warning step (lead in steps) per detector / threshold")
    for r in runs:
        label_ = "-" if r.label is None else str(r.label)
        cells = []
        for c in columns:
            if c in r.first:
                lead = "" if r.label is None else f" ({r.label - r.first[c]:+d})"
                cells.append(f"{c}@{r.first[c]}{lead}")
        print(f"{f'{r.regime} s{r.seed}':<20}{len(r.records):>6}{label_:>7}  {', '.join(cells) or '-'}")
    healthy_steps = sum(len(r.records) for r in healthy)
    print(f"\n{len(failed)} runs failed (by their own state), {len(healthy)} did not ({healthy_steps} optimizer steps)")
    print(
        f"\n{'detector / threshold':<22}{'flagged <= label + 1 rollout':>30}{'median lead (steps)':>21}"
        f"{'false warnings / 1,000 healthy steps':>38}"
    )
    for c in columns:
        in_time = [r for r in failed if c in r.first and r.first[c] <= r.label + r.updates_per_rollout]
        leads = [r.label - r.first[c] for r in in_time]
        false = sum(r.alarms.get(c, 0) for r in healthy)
        rate = 1000.0 * false / healthy_steps if healthy_steps else float("nan")
        med = f"{statistics.median(leads):+.0f}" if leads else "-"
        print(f"{c:<22}{f'{len(in_time)}/{len(failed)}':>30}{med:>21}{f'{rate:.2f} ({false})':>38}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per configuration (default 5)")
    parser.add_argument("--quick", action="store_true", help="1 seed, half-length runs")
    parser.add_argument("--out", help="directory for the metrics files (reused when present; default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="mhpo-early-warning-"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = 1 if args.quick else args.seeds
    t0 = time.monotonic()
    runs = []
    for regime, (_, rollouts) in REGIMES.items():
        for seed in range(seeds):
            n = rollouts // 2 if args.quick else rollouts
            run = Run(regime, seed, train(regime, seed, n, out))
            label(run)
            evaluate(run)
            runs.append(run)
    print(f"{len(runs)} runs in {time.monotonic() - t0:.0f} s; metrics files in {out}")
    report(runs)


if __name__ == "__main__":
    main()
