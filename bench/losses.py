"""Loss and diagnostics timings on CPU: forward+backward per loss, the diagnostics reduction
(update + compute of one step), and the MHPO/GRPO and diagnostics/MHPO ratios measured
interleaved in this run.

    python bench/losses.py [--repeats 9] [--threads 1] [--sizes 64x2048,256x8192] [--device cpu]

Each figure is the best of the repeats in milliseconds, as process CPU time (what the work
costs, robust to other load on a shared machine) and wall-clock time; the ratios use the
median CPU times of the interleaved runs (wall-clock times on CUDA, where the CPU time only
measures the launches). (256, 8192) runs a third of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mhpo.diagnostics import DiagnosticsAccumulator
from mhpo.losses import LOSSES, get_loss


def make_batch(b: int, t: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(b, t, generator=g) * 0.5 - 1.5
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    batch = {
        "logp": logp,
        "old_logp": logp + torch.randn(b, t, generator=g) * 0.1,
        "advantages": torch.randn(b, generator=g),
        "mask": torch.arange(t)[None, :] < lengths[:, None],
    }
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """(cpu ms, wall ms) of one call, the device's queue drained before and after."""
    sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return (time.process_time() - cpu) * 1e3, (time.perf_counter() - wall) * 1e3


def fwd_bwd(name: str, batch: dict[str, torch.Tensor]) -> Callable[[], object]:
    loss_fn = get_loss(name)

    def step() -> None:
        logp = batch["logp"].clone().requires_grad_(True)
        loss_fn(logp, batch["old_logp"], batch["advantages"], batch["mask"]).loss.backward()

    return step


def diagnostics(batch: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> Callable[[], object]:
    def step() -> None:
        acc = DiagnosticsAccumulator("mhpo", {}, top_k=8)
        acc.update(**batch, loss_stats=stats)
        acc.compute()

    return step


def bench(b: int, t: int, repeats: int, device: str) -> None:
    batch = make_batch(b, t, device)
    stats = get_loss("mhpo")(**batch).stats
    print(f"\n(B, T) = ({b}, {t}): {int(batch['mask'].sum())} valid tokens, {repeats} repeats, "
          f"{device}, {torch.get_num_threads()} thread(s); best ms, cpu / wall")  # fmt: skip
    for name in LOSSES:
        fwd_bwd(name, batch)()  # warm-up
        runs = [timed(fwd_bwd(name, batch), device) for _ in range(repeats)]
        print(f"  {name:<10} fwd+bwd {min(r[0] for r in runs):8.1f} / {min(r[1] for r in runs):8.1f}")
    jobs = {"grpo": fwd_bwd("grpo", batch), "mhpo": fwd_bwd("mhpo", batch), "diagnostics": diagnostics(batch, stats)}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
    for job in jobs.values():
        job()
    for _ in range(repeats):  # interleaved, so load on the machine hits all three alike
        for key, job in jobs.items():
            runs[key].append(timed(job, device))
    best = {k: (min(r[0] for r in v), min(r[1] for r in v)) for k, v in runs.items()}
    col = 1 if device.startswith("cuda") else 0
    med = {k: statistics.median(r[col] for r in v) for k, v in runs.items()}
    print("  interleaved: " + "  ".join(f"{k} {c:.1f} / {w:.1f}" for k, (c, w) in best.items()))
    print(f"  MHPO / GRPO fwd+bwd = {med['mhpo'] / med['grpo']:.2f}x   "
          f"diagnostics / MHPO loss = {med['diagnostics'] / med['mhpo']:.2f}x  "
          f"(median {'wall' if col else 'cpu'} time)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="repeats for (64, 2048)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--sizes", default="64x2048,256x8192", help="comma-separated BxT sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for size in args.sizes.split(","):
        b, t = (int(v) for v in size.split("x"))
        bench(b, t, args.repeats if b * t <= 64 * 2048 * 4 else max(3, args.repeats // 3), args.device)


if __name__ == "__main__":
    main()
