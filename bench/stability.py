"""Grad-norm stability of MHPO, GRPO and DAPO at an aggressive learning rate.

The MHPO paper claims its soft trust region keeps the gradient norm low and smooth where
hard-clipped GRPO/DAPO spike. This script trains the tiny model on the demo task (1-digit
addition, warmed up) with each loss and several seeds at `--lr` (default 3e-3, six times the
demo's), and reports per loss: grad-norm spikes (an optimizer step whose pre-clip grad-norm
exceeds `--spike-factor` x the median of the previous 10 steps of the run), the median and
max grad-norm, and the final reward (mean over the last 5 rollouts). It saves the grad-norm
and reward curves to a PNG (matplotlib, `pip install -e ".[bench]"`).

    python bench/stability.py                             # 3 seeds x 25 rollouts x 3 losses
    python bench/stability.py --seeds 2 --steps 15 --out artifacts/stability-quick.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mhpo.trainer import Trainer, TrainerConfig

LOSSES = ("mhpo", "grpo", "dapo")


def spikes(norms: list[float], factor: float, window: int = 10) -> int:
    """Steps whose grad-norm exceeds `factor` x the median of the `window` steps before.

    Steps with a zero gradient (every group degenerate: no learning signal at all) are left out
    of both the candidates and the baseline, so a collapsed run does not count as spiking."""
    live = [n for n in norms if n > 0]
    return sum(1 for i in range(window, len(live)) if live[i] > factor * statistics.median(live[i - window : i]))


def run(loss: str, seed: int, steps: int, lr: float) -> tuple[list[float], list[float]]:
    """Per-optimizer-step grad-norms and per-rollout rewards of one run."""
    trainer = Trainer(TrainerConfig(loss=loss, seed=seed, steps=steps, lr=lr, stream=False, progress=False))
    norms, rewards = [], []
    for _ in range(steps):
        records = trainer.step()
        norms += [r["scalars"]["grad/norm"] for r in records]
        rewards.append(records[0]["scalars"]["reward/mean"])
    return norms, rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="rollouts per run")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (the demo uses 5e-4)")
    parser.add_argument("--spike-factor", type=float, default=3.0)
    parser.add_argument(
        "--out",
        default=str(REPO_ROOT / "artifacts" / "stability.png"),
        help="PNG path; the numbers go next to it as .json",
    )
    args = parser.parse_args()
    os.environ.setdefault("MHPO_SPOOL_DIR", tempfile.mkdtemp(prefix="mhpo-stability-"))
    results: dict[str, list[tuple[list[float], list[float]]]] = {loss: [] for loss in LOSSES}
    for seed in range(args.seeds):
        for loss in LOSSES:
            results[loss].append(run(loss, seed, args.steps, args.lr))
            print(f"done {loss} seed {seed}", file=sys.stderr, flush=True)

    print(
        f"lr {args.lr:g}, {args.seeds} seeds x {args.steps} rollouts (2 optimizer steps each), "
        f"spike = grad-norm > {args.spike_factor:g} x median of the previous 10 steps"
    )
    print(
        f"{'loss':6}{'spikes/run':>12}{'median gnorm':>14}{'max gnorm':>11}{'zero-grad':>11}"
        f"{'first reward':>14}{'final reward':>14}"
    )
    for loss, runs in results.items():
        n_spikes = statistics.fmean(spikes(n, args.spike_factor) for n, _ in runs)
        live = [v for n, _ in runs for v in n if v > 0]
        everything = [v for n, _ in runs for v in n]
        dead = sum(1 for v in everything if v == 0) / len(everything)
        first = statistics.fmean(statistics.fmean(r[:3]) for _, r in runs)
        final = statistics.fmean(statistics.fmean(r[-5:]) for _, r in runs)
        print(
            f"{loss:6}{n_spikes:12.2f}{statistics.median(live):14.3f}{max(live):11.3f}{dead:11.0%}"
            f"{first:14.3f}{final:14.3f}"
        )
    print(
        "median/max grad-norm over steps with a gradient; zero-grad = share of optimizer steps where every "
        "group's rewards were equal (after a collapse to reward 0, nothing is left to learn from)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"lr": args.lr, "results": results}))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(LOSSES), figsize=(5 * len(LOSSES), 7), sharey="row")
    for j, (loss, runs) in enumerate(results.items()):
        for seed, (norms, rewards) in enumerate(runs):
            axes[0, j].plot(norms, label=f"seed {seed}", lw=1)
            axes[1, j].plot(rewards, label=f"seed {seed}", lw=1)
        axes[0, j].set_title(f"{loss}: grad-norm (pre-clip)")
        axes[0, j].set_yscale("log")
        axes[0, j].set_xlabel("optimizer step")
        axes[1, j].set_title(f"{loss}: reward")
        axes[1, j].set_xlabel("rollout")
        axes[0, j].legend(fontsize=7)
    fig.suptitle(f"tiny model, 1-digit addition, lr {args.lr:g}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
