"""The diagnostics reduction under torch.distributed, for real: 2 processes on gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mhpo.diagnostics import DiagnosticsAccumulator
from mhpo.losses import get_loss


def rank_batch(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    b, t = 4 + rank, 30  # ranks hold different numbers of samples
    logp = torch.randn(b, t, generator=g) * 0.5 - 1.5
    return {
        "logp": logp,
        "old_logp": logp + torch.randn(b, t, generator=g) * (0.2 + 0.3 * rank),
        "advantages": torch.randn(b, generator=g),
        "mask": torch.rand(b, t, generator=g) > 0.2,
    }


def local_stats(batch: dict[str, torch.Tensor]):
    acc = DiagnosticsAccumulator("mhpo", {}, top_k=4)
    acc.update(**batch, loss_stats=get_loss("mhpo")(**batch).stats)
    return acc.compute()


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = local_stats(rank_batch(rank))
        torch.save(stats._asdict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_reduction_sums_the_bins(tmp_path: Path) -> None:
    """Bin counts are the sums of the ranks' counts; scalars, percentiles and outliers merge."""
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reduced = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert reduced[0] == reduced[1]  # every rank gets the same statistics
    got = reduced[0]
    singles = [local_stats(rank_batch(r)) for r in range(2)]
    for key, hist in got["histograms"].items():
        parts = [s.histograms[key] for s in singles]
        assert hist["counts"] == [a + b for a, b in zip(parts[0]["counts"], parts[1]["counts"], strict=True)], key
        assert hist["underflow"] == parts[0]["underflow"] + parts[1]["underflow"]
        assert hist["overflow"] == parts[0]["overflow"] + parts[1]["overflow"]
        assert hist["min"] == min(p["min"] for p in parts) and hist["max"] == max(p["max"] for p in parts)
        assert hist["sum"] == pytest.approx(parts[0]["sum"] + parts[1]["sum"], rel=1e-9)

    merged = torch.cat([(b["logp"] - b["old_logp"])[b["mask"]] for b in map(rank_batch, range(2))])
    s = got["scalars"]
    assert s["ratio/mean"] == pytest.approx(merged.double().mean().item(), abs=1e-6)
    assert s["ratio/std"] == pytest.approx(merged.double().std(unbiased=False).item(), abs=1e-6)
    for key, q in (("p05", 0.05), ("p50", 0.5), ("p95", 0.95)):
        assert s[f"ratio/{key}"] == pytest.approx(torch.quantile(merged.double(), q).item(), abs=2 * 4 / 4096)
    lp = torch.cat([b["logp"][b["mask"]] for b in map(rank_batch, range(2))]).double()
    adv = torch.cat([b["advantages"][:, None].expand_as(b["mask"])[b["mask"]] for b in map(rank_batch, range(2))])
    cov = ((adv.double() - adv.double().mean()) * (lp - lp.mean())).mean().item()
    assert s["policy/cov_logp_adv"] == pytest.approx(cov, rel=1e-9)
    assert s["policy/corr_logp_adv"] == pytest.approx(torch.corrcoef(torch.stack([adv.double(), lp]))[0, 1].item())
    n = [b["mask"].sum().item() for b in map(rank_batch, range(2))]
    assert s["policy/length_mean"] == pytest.approx(sum(n) / (4 + 5))
    assert s["train/loss"] == pytest.approx((singles[0].scalars["train/loss"] + singles[1].scalars["train/loss"]) / 2)
    # Outliers: the global top 4, sample indices counted across ranks (rank 1 starts at 4).
    candidates = singles[0].outliers + [{**o, "sample": o["sample"] + 4} for o in singles[1].outliers]
    top = sorted(candidates, key=lambda o: -abs(o["x"]))
    assert got["outliers"] == top[:4]


def mismatch_batch(rank: int) -> dict[str, torch.Tensor]:
    """`rank_batch` plus a sampler's log-probs: a gap that differs by rank, junk on masked tokens."""
    batch = rank_batch(rank)
    g = torch.Generator().manual_seed(200 + rank)
    rollout = batch["old_logp"] + torch.randn(batch["old_logp"].shape, generator=g) * (0.02 + 0.2 * rank)
    batch["rollout_logp"] = rollout.masked_fill(~batch["mask"], float("nan"))
    return batch


def mismatch_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        acc = DiagnosticsAccumulator("grpo", {}, top_k=2)
        acc.update(**mismatch_batch(rank))
        torch.save(acc.compute()._asdict(), Path(out_dir) / f"mm{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_reduction_merges_the_sampler_statistics(tmp_path: Path) -> None:
    """The ranks' `mismatch/*` statistics and bins equal those of one process holding both batches."""
    mp.spawn(mismatch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reduced = [torch.load(tmp_path / f"mm{r}.pt", weights_only=False) for r in range(2)]
    assert reduced[0] == reduced[1]
    both = [mismatch_batch(r) for r in range(2)]
    whole = DiagnosticsAccumulator("grpo", {}, top_k=2)
    whole.update(**{k: torch.cat([b[k] for b in both]) for k in both[0]})
    expected = whole.compute()
    keys = [k for k in expected.scalars if k.startswith("mismatch/")]
    assert len(keys) >= 14
    for key in keys:
        assert reduced[0]["scalars"][key] == pytest.approx(expected.scalars[key], rel=1e-9, abs=1e-12), key
    got, want = reduced[0]["histograms"]["mismatch"], expected.histograms["mismatch"]
    for key in ("counts", "underflow", "overflow", "min", "max", "lo", "hi"):
        assert got[key] == want[key], key
    assert got["sum"] == pytest.approx(want["sum"], rel=1e-9) and got["sumsq"] == pytest.approx(want["sumsq"], rel=1e-9)
