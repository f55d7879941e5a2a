"""Sampler vs trainer on real `mhpo train` runs: each regime's mismatch, the first `mismatch` flag, the damage.

Trains real runs of the built-in tiny model on CPU (`mhpo train --no-stream --metrics-file`,
the records exactly as they would be streamed; see `bench/early_warning.py`), then runs the
service's detectors (`mhpo_server.monitoring.detect`, what the ingest listener runs) on them:

- `synced_fp32`: the sampler is the trained float32 policy itself (the healthy reference);
- `bf16_sampler`: samples with a bfloat16 copy of the policy, refreshed every rollout (`--rollout-dtype bfloat16`);
- `top_k`: sampling restricted to the 3 likeliest tokens, the sampler's log-probs renormalised over them (`--top-k 3`);
- `stale_k4`, `stale_k4_tis`, `stale_k4_mis`: the sampler's weights refreshed every 4 rollouts
  (`--rollout-sync-every 4`) at twice the learning rate (1e-3), uncorrected, with token-level truncated
  importance sampling (`--is-correction tis --is-cap 2`) and with masked importance sampling
  (`--is-correction mis --is-cap 2`).

Every run: GRPO, 4 prompts x 8 completions per rollout, 2 optimizer steps per rollout.

A run is labelled degraded by its own state (as in `bench/early_warning.py`: entropy under 25 % of its start,
or the reward under half its running peak, for 3 rollouts in a row). Per run it prints the median and
maximum mean |d| (`mismatch/abs_mean`), the median IS mean, the first `mismatch` warning or critical flag
(optimizer step), the label and the lead (label - first flag; > 0 is early); per regime the same summarised
with the final reward and entropy (mean of the last 4 rollouts).

    python bench/mismatch.py                 # 3 seeds x 6 regimes, 20 rollouts each (~15 minutes on 2 busy cores)
    python bench/mismatch.py --seeds 1       # one seed per regime
    python bench/mismatch.py --out DIR       # keep the metrics files (reused when present)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from early_warning import Run, by_rollout, label, train

from mhpo_server.monitoring import History, detect

BASE = ["--loss", "grpo", "--prompts-per-step", "4", "--group-size", "8"]
STALE = [*BASE, "--rollout-sync-every", "4", "--lr", "1e-3"]
REGIMES: dict[str, list[str]] = {
    "synced_fp32": BASE,
    "bf16_sampler": [*BASE, "--rollout-dtype", "bfloat16"],
    "top_k": [*BASE, "--top-k", "3"],
    "stale_k4": STALE,
    "stale_k4_tis": [*STALE, "--is-correction", "tis", "--is-cap", "2"],
    "stale_k4_mis": [*STALE, "--is-correction", "mis", "--is-cap", "2"],
}
ALARM = ("warning", "critical")


def mismatch_flags(run: Run) -> list:
    points: dict[str, dict[int, float]] = {}
    for r in run.records:
        for key, value in r["scalars"].items():
            points.setdefault(key, {})[int(r["step"])] = float(value)
    steps = [int(r["step"]) for r in run.records]
    return [f for f in detect(History(points), steps) if f.kind == "mismatch" and f.severity in ALARM]


def tail(run: Run, key: str, rollouts: int = 4) -> float:
    groups = by_rollout(run.records)
    return statistics.fmean(groups[r][0]["scalars"][key] for r in sorted(groups)[-rollouts:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per regime (default 3)")
    parser.add_argument("--rollouts", type=int, default=20, help="rollouts per run (default 20)")
    parser.add_argument("--out", help="directory for the metrics files (reused when present; default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="mhpo-mismatch-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows: dict[str, list[dict]] = {}
    print(
        f"{'run':<18}{'|d| median':>11}{'|d| max':>9}{'IS mean':>9}{'1st flag':>9}{'severity':>10}{'label':>7}{'lead':>6}"
    )
    for regime, flags in REGIMES.items():
        for seed in range(args.seeds):
            run = Run(regime, seed, train(f"mm-{regime}", seed, args.rollouts, out, flags))
            label(run)
            found = mismatch_flags(run)
            gaps = [r["scalars"]["mismatch/abs_mean"] for r in run.records]
            is_mean = statistics.median(r["scalars"]["mismatch/is_mean"] for r in run.records)
            first = found[0] if found else None
            lead = run.label - first.step if first is not None and run.label is not None else None
            row = {
                "gap": statistics.median(gaps),
                "gap_max": max(gaps),
                "is_mean": is_mean,
                "first": None if first is None else first.step,
                "label": run.label,
                "lead": lead,
                "flags": len(found),
                "reward": tail(run, "reward/mean"),
                "entropy": tail(run, "policy/entropy"),
            }
            rows.setdefault(regime, []).append(row)
            cells = [
                f"{row['gap']:>11.2e}",
                f"{row['gap_max']:>9.2e}",
                f"{is_mean:>9.3f}",
                f"{'-' if first is None else first.step:>9}",
                f"{'-' if first is None else first.severity:>10}",
                f"{'-' if run.label is None else run.label:>7}",
                f"{'-' if lead is None else f'{lead:+d}':>6}",
            ]
            print(f"{f'{regime} s{seed}':<18}{''.join(cells)}", flush=True)
    print(f"\n{sum(map(len, rows.values()))} runs in {time.monotonic() - t0:.0f} s; metrics files in {out}\n")
    print(
        f"{'regime':<14}{'|d| median':>11}{'IS mean':>9}{'flagged':>9}{'1st flag (median)':>19}"
        f"{'degraded':>10}{'lead (median)':>15}{'reward end':>12}{'entropy end':>13}"
    )
    for regime, rs in rows.items():
        flagged = [r["first"] for r in rs if r["first"] is not None]
        degraded = [r for r in rs if r["label"] is not None]
        leads = [r["lead"] for r in rs if r["lead"] is not None]
        cells = [
            f"{statistics.median(r['gap'] for r in rs):>11.2e}",
            f"{statistics.median(r['is_mean'] for r in rs):>9.3f}",
            f"{f'{len(flagged)}/{len(rs)}':>9}",
            f"{statistics.median(flagged) if flagged else '-':>19}",
            f"{f'{len(degraded)}/{len(rs)}':>10}",
            f"{f'{statistics.median(leads):+.0f}' if leads else '-':>15}",
            f"{statistics.fmean(r['reward'] for r in rs):>12.3f}",
            f"{statistics.fmean(r['entropy'] for r in rs):>13.3f}",
        ]
        print(f"{regime:<14}{''.join(cells)}")


if __name__ == "__main__":
    main()
