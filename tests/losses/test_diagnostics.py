"""The diagnostics reduction against numpy references, micro-batch merging, and bad data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mhpo.diagnostics import (
    HISTOGRAMS,
    DiagnosticsAccumulator,
    HistSpec,
    _exact_quantiles,
    _quantiles_by_sort,
    _quantiles_from_hist,
    compute_step_stats,
)
from mhpo.losses import get_loss
from mhpo.losses.mhpo import hazard

NAMES = ["mhpo", "grpo", "dapo", "dual_clip", "gspo", "sapo", "cispo"]


def batch(seed: int = 0, b: int = 8, t: int = 40, scale: float = 0.4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(b, t, generator=g) * 0.5 - 1.5
    old = logp + torch.randn(b, t, generator=g) * scale
    old[0, :3] = logp[0, :3]  # exact zeros: neither positive nor negative mass
    adv = torch.randn(b, generator=g)
    adv[1] = 0.0
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, :3] = True
    return {"logp": logp, "old_logp": old, "advantages": adv, "mask": mask}


def run(name: str, parts: list[dict[str, torch.Tensor]], **hp: float):
    acc = DiagnosticsAccumulator(name, hp, top_k=5)
    for p in parts:
        out = get_loss(name)(p["logp"], p["old_logp"], p["advantages"], p["mask"], **hp)  # type: ignore[arg-type]
        acc.update(**p, loss_stats=out.stats)
    return acc.compute()


def split(d: dict[str, torch.Tensor], at: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v[:at] for k, v in d.items()}, {k: v[at:] for k, v in d.items()}]


@pytest.mark.parametrize("name", NAMES)
def test_scalars_and_histograms_match_numpy(name: str) -> None:
    d = batch()
    stats = run(name, [d])
    m = d["mask"].numpy()
    x = (d["logp"] - d["old_logp"]).double().numpy()[m]
    a = d["advantages"][:, None].expand_as(d["logp"]).double().numpy()[m]
    s = stats.scalars
    assert s["ratio/mean"] == pytest.approx(x.mean(), abs=1e-6)
    assert s["ratio/std"] == pytest.approx(x.std(), abs=1e-6)
    assert (s["ratio/min"], s["ratio/max"]) == pytest.approx((x.min(), x.max()), abs=1e-6)
    for key, q in (("p01", 1), ("p05", 5), ("p50", 50), ("p95", 95), ("p99", 99)):
        assert s[f"ratio/{key}"] == pytest.approx(np.percentile(x, q), abs=1e-6)
    assert s["ratio/pos_mass"] == pytest.approx((x > 0).mean())
    assert s["ratio/neg_mass"] == pytest.approx((x < 0).mean())
    assert s["ratio/pos_mass"] + s["ratio/neg_mass"] < 1  # the exact zeros count on neither side
    for t in (0.1, 0.2, 0.5, 1):
        assert s[f"ratio/frac_above_{t:g}"] == pytest.approx((x > t).mean())
        assert s[f"ratio/frac_below_{t:g}"] == pytest.approx((x < -t).mean())
    assert s["policy/kl_k1"] == pytest.approx(-x.mean(), abs=1e-6)
    assert s["policy/kl_k3"] == pytest.approx((np.expm1(x) - x).mean(), abs=1e-6)
    assert s["policy/length_mean"] == pytest.approx(m.sum(1).mean())
    assert s["ratio/nonfinite_frac"] == 0.0
    assert s["train/loss"] == pytest.approx(get_loss(name)(**d).loss.item())

    h = stats.histograms["log_ratio"]
    counts, _ = np.histogram(x, bins=HISTOGRAMS["log_ratio"].bins, range=(-2, 2))
    assert h["counts"] == counts.tolist()
    assert h["underflow"] == int((x < -2).sum()) and h["overflow"] == int((x >= 2).sum())
    assert (h["sum"], h["sumsq"]) == pytest.approx((x.sum(), (x * x).sum()), abs=1e-4)
    pos = stats.histograms["log_ratio/adv_pos"]
    assert sum(pos["counts"]) + pos["underflow"] + pos["overflow"] == int((a > 0).sum())
    assert pos["max"] == pytest.approx(x[a > 0].max(), abs=1e-6)
    neg = stats.histograms["log_ratio/adv_neg"]
    assert neg["counts"] == np.histogram(x[a < 0], bins=HISTOGRAMS["log_ratio"].bins, range=(-2, 2))[0].tolist()

    # Hazard terms are MHPO's with the paper defaults for every loss; M is the loss's own.
    xt = torch.tensor(x)
    _, _, zp, zn = hazard(xt, get_loss("mhpo").defaults)
    zeta = (zp + zn).numpy()
    assert s["hazard/zeta_mean"] == pytest.approx(zeta.mean(), rel=1e-5)
    assert s["hazard/zeta_p99"] == pytest.approx(np.percentile(zeta, 99), rel=1e-5)
    assert s["hazard/zeta_pos_mean"] == pytest.approx(zp.mean().item(), rel=1e-5)
    assert s["hazard/survival_mean"] == pytest.approx(np.exp(-zeta).mean(), rel=1e-5)
    if name == "gspo":
        seq = (torch.where(d["mask"], d["logp"] - d["old_logp"], 0.0).sum(1) / d["mask"].sum(1)).double()
        xt = seq[:, None].expand_as(d["logp"]).numpy()[m]
        xt = torch.tensor(xt)
    mult = get_loss(name).multiplier(xt, torch.tensor(a)).numpy()
    assert s["grad/multiplier_mean"] == pytest.approx(mult.mean(), rel=1e-5)
    assert s["grad/multiplier_max"] == pytest.approx(mult.max(), rel=1e-5)
    assert s["grad/vanish_frac"] == pytest.approx((mult < 0.01).mean())
    assert sum(stats.histograms["multiplier"]["counts"]) + stats.histograms["multiplier"]["overflow"] == len(x)


def test_clip_fractions_follow_each_loss_window() -> None:
    d = batch(scale=0.3)
    m = d["mask"].numpy()
    x = (d["logp"] - d["old_logp"]).double().numpy()[m]
    a = d["advantages"][:, None].expand_as(d["logp"]).double().numpy()[m]
    for name, lo, hi in (
        ("grpo", 0.8, 1.2), ("mhpo", 0.8, 1.2), ("sapo", 0.8, 1.2), ("dapo", 0.8, 1.28), ("cispo", 0.0, 6.0),
    ):  # fmt: skip
        s = run(name, [d]).scalars
        low, high = ((x < math.log(lo)) & (a < 0)).mean() if lo else 0.0, ((x > math.log(hi)) & (a > 0)).mean()
        assert (s["ratio/clip_frac_low"], s["ratio/clip_frac_high"]) == pytest.approx((low, high)), name
        assert s["ratio/clip_frac"] == pytest.approx(low + high)


def test_mhpo_hazard_uses_the_runs_own_hyper_parameters() -> None:
    d = batch()
    default = run("mhpo", [d]).scalars["hazard/zeta_mean"]
    assert run("grpo", [d]).scalars["hazard/zeta_mean"] == pytest.approx(default)
    custom = run("mhpo", [d], c=2.0, lambda_neg=1.0).scalars["hazard/zeta_mean"]
    x = torch.where(d["mask"], d["logp"] - d["old_logp"], 0.0)[d["mask"]]
    _, _, zp, zn = hazard(x, {**get_loss("mhpo").defaults, "c": 2.0, "lambda_neg": 1.0})
    assert custom == pytest.approx((zp + zn).mean().item(), rel=1e-6)
    assert custom != pytest.approx(default, rel=1e-3)


@pytest.mark.parametrize("name", ["mhpo", "gspo", "grpo"])
def test_micro_batches_merge_to_the_whole_step(name: str) -> None:
    d = batch(b=10)
    d["entropy"] = torch.rand(10, 40, generator=torch.Generator().manual_seed(3))
    d["token_ids"] = torch.arange(400).reshape(10, 40)
    whole, parts = run(name, [d]), run(name, split(d, 4))
    for key, h in whole.histograms.items():
        assert parts.histograms[key]["counts"] == h["counts"], key
        assert parts.histograms[key]["min"] == h["min"] and parts.histograms[key]["max"] == h["max"]
        assert parts.histograms[key]["sum"] == pytest.approx(h["sum"], rel=1e-5, abs=1e-5)
    for key, v in whole.scalars.items():
        if key != "train/loss":  # the mean of the micro-batch losses, not the loss of the whole batch
            assert parts.scalars[key] == pytest.approx(v, rel=1e-5, abs=1e-6), key
    assert parts.outliers == whole.outliers
    assert whole.scalars["policy/entropy"] == pytest.approx(d["entropy"][d["mask"]].mean().item(), rel=1e-6)


def test_outliers_are_the_top_k_by_absolute_log_ratio() -> None:
    d = batch(b=4, t=10)
    d["token_ids"] = torch.arange(40).reshape(4, 10) + 1000
    d["old_logp"][2, 7], d["mask"][2, 7] = d["logp"][2, 7] - 9.0, True
    d["old_logp"][3, 1], d["mask"][3, 1] = d["logp"][3, 1] + 50.0, False  # masked: never an outlier
    stats = run("grpo", split(d, 2))
    assert len(stats.outliers) == 5
    first = stats.outliers[0]
    assert (first["sample"], first["position"], first["token_id"], first["text"]) == (2, 7, 1027, "")
    assert first["x"] == pytest.approx(9.0, rel=1e-6) and first["A"] == pytest.approx(d["advantages"][2].item())
    _, _, zp, zn = hazard(torch.tensor([9.0]), get_loss("mhpo").defaults)
    assert first["zeta"] == pytest.approx((zp + zn).item(), rel=1e-5)
    got = [abs(o["x"]) for o in stats.outliers]
    assert got == sorted(got, reverse=True)


def test_non_finite_tokens_are_counted_not_hidden() -> None:
    d = batch(b=2, t=6)
    d["mask"][:] = True
    d["mask"][1, 5] = False
    d["old_logp"][1, 5] = math.nan  # masked NaN: ignored everywhere
    clean = run("mhpo", [d])
    assert clean.scalars["ratio/nonfinite_frac"] == 0.0 and math.isfinite(clean.scalars["ratio/mean"])
    d["old_logp"][0, 0] = -math.inf  # x = +inf
    d["old_logp"][0, 1] = math.nan  # x = NaN
    stats = run("mhpo", [d])
    s = stats.scalars
    assert s["ratio/nonfinite_frac"] == pytest.approx(2 / 11)
    assert math.isnan(s["ratio/mean"]) and math.isnan(s["hazard/zeta_mean"]) and math.isnan(s["train/loss"])
    assert s["ratio/max"] == math.inf
    h = stats.histograms["log_ratio"]
    assert sum(h["counts"]) + h["underflow"] + h["overflow"] == 10  # NaN cannot be binned
    assert h["overflow"] >= 1
    assert math.isnan(stats.outliers[0]["x"])  # the NaN token is the first outlier


def test_empty_split_histograms_are_left_out() -> None:
    d = batch(b=3, t=5)
    d["advantages"] = torch.tensor([1.0, 2.0, 0.5])
    stats = run("grpo", [d])
    assert "log_ratio/adv_neg" not in stats.histograms and "log_ratio/adv_pos" in stats.histograms


def test_helper_without_loss_stats_computes_the_multiplier_itself() -> None:
    d = batch()
    with_stats = run("mhpo", [d])
    alone = compute_step_stats("mhpo", **d, top_k=5)
    for key in ("grad/multiplier_mean", "hazard/zeta_mean", "ratio/p50"):
        assert alone.scalars[key] == pytest.approx(with_stats.scalars[key], rel=1e-6)
    assert "train/loss" not in alone.scalars and "policy/entropy" not in alone.scalars


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="unknown loss 'ppo'; valid losses"):
        DiagnosticsAccumulator("ppo", {})
    with pytest.raises(ValueError, match="unknown hyper-parameter tau for loss 'mhpo'"):
        DiagnosticsAccumulator("mhpo", {"tau": 1.0})
    acc = DiagnosticsAccumulator("mhpo", {})
    with pytest.raises(RuntimeError, match=r"before any update\(\)"):
        acc.compute()
    d = batch()
    with pytest.raises(ValueError, match=r"entropy has shape \(3, 40\) but logp has shape \(8, 40\)"):
        acc.update(**d, entropy=torch.zeros(3, 40))
    with pytest.raises(ValueError, match=r"mask has shape"):
        acc.update(d["logp"], d["old_logp"], d["advantages"], d["mask"][:, :5])


def test_quantile_paths_agree() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3000, generator=g) * 0.3
    ok = torch.rand(3000, generator=g) > 0.1
    qs = [0.01, 0.05, 0.5, 0.95, 0.99]
    ref = torch.quantile(v[ok].double(), torch.tensor(qs, dtype=torch.float64))
    assert torch.allclose(_exact_quantiles(v, ok, qs), ref)
    assert torch.allclose(_quantiles_by_sort(v, ok, qs), ref)
    spec = HistSpec(-2.0, 2.0, 4096)
    counts = torch.tensor(np.histogram(v[ok].numpy(), bins=4096, range=(-2, 2))[0], dtype=torch.float64)
    counts = torch.cat([torch.zeros(1, dtype=torch.float64), counts, torch.zeros(1, dtype=torch.float64)])
    approx = _quantiles_from_hist(counts, spec, v[ok].min(), v[ok].max(), qs)
    assert torch.allclose(approx, ref, atol=4 / 4096)
    assert HISTOGRAMS["log_ratio"].bins >= 64


def exact_counts(v: np.ndarray, spec: HistSpec) -> list[int]:
    """Underflow, bins, overflow of `v` against the exact edges lo + i * (hi - lo) / bins."""
    from fractions import Fraction

    w = (Fraction(spec.hi) - Fraction(spec.lo)) / spec.bins
    out = [0] * (spec.bins + 2)
    for value in v.tolist():
        i = math.floor((Fraction(value) - Fraction(spec.lo)) / w)
        out[min(max(i, -1), spec.bins) + 1] += 1
    return out


def on_edges_batch() -> dict[str, torch.Tensor]:
    """x = logp - old_logp exactly on and next to bin edges and thresholds (logp = 0 makes x exact)."""
    f32 = np.float32
    edges = [0.0, 0.5, -0.5, 1.0, -1.0, 0.125, -0.125, 2.0, -2.0, 0.1, -0.1, 0.2, -0.2]
    xs = [f32(e) for e in edges]
    xs += [np.nextafter(f32(e), f32(np.inf)) for e in edges] + [np.nextafter(f32(e), f32(-np.inf)) for e in edges]
    xs += [f32(-1e-8), f32(1e-8), f32(-1e-30), f32(0.025), f32(-0.025), f32(3.0), f32(-3.0)]
    x = torch.tensor(np.array(xs, dtype=np.float32))
    t = x.numel()
    logp = torch.zeros(2, t)
    old = torch.stack([-x, -x.flip(0)])
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, :5] = False
    old[1, :5] = math.nan  # masked NaN: ignored, and sends the update down the NaN-safe path
    return {"logp": logp, "old_logp": old, "advantages": torch.tensor([1.0, -1.0]), "mask": mask}


@pytest.mark.parametrize("nan_masked", [False, True])
def test_values_on_bin_edges_follow_the_exact_edges_and_strict_thresholds(nan_masked: bool) -> None:
    d = on_edges_batch()
    if not nan_masked:
        d["old_logp"] = torch.nan_to_num(d["old_logp"], nan=0.0)
    stats = run("mhpo", [d])
    m = d["mask"].numpy()
    x = (d["logp"] - d["old_logp"]).numpy()[m]
    spec = HISTOGRAMS["log_ratio"]
    h = stats.histograms["log_ratio"]
    assert [h["underflow"], *h["counts"], h["overflow"]] == exact_counts(x, spec)
    neg = stats.histograms["log_ratio/adv_neg"]
    assert [neg["underflow"], *neg["counts"], neg["overflow"]] == exact_counts(x[x.size - int(m[1].sum()) :], spec)
    s = stats.scalars
    x64 = x.astype(np.float64)
    assert s["ratio/pos_mass"] == (x64 > 0).mean() and s["ratio/neg_mass"] == (x64 < 0).mean()
    for t in (0.1, 0.2, 0.5, 1.0):
        assert s[f"ratio/frac_above_{t:g}"] == (x64 > t).mean(), t  # x == t is not above
        assert s[f"ratio/frac_below_{t:g}"] == (x64 < -t).mean(), t
    for key, q in (("p01", 1), ("p50", 50), ("p99", 99)):
        assert s[f"ratio/{key}"] == pytest.approx(np.percentile(x64, q), abs=1e-7)


def test_psi_zeta_multiplier_bins_are_exact_and_both_paths_agree() -> None:
    d = batch(seed=4, b=6, t=50, scale=0.6)
    clean = run("mhpo", [d])
    d_nan = {k: v.clone() for k, v in d.items()}
    masked = (~d_nan["mask"]).nonzero()[0]
    d_nan["old_logp"][masked[0], masked[1]] = math.inf  # masked, so ignored, but not finite
    other = run("mhpo", [d_nan])
    out = get_loss("mhpo")(**d)
    m = d["mask"].numpy()
    for key in ("psi", "zeta", "multiplier"):
        v = out.stats[key].numpy()[m]
        h = clean.histograms[key]
        assert [h["underflow"], *h["counts"], h["overflow"]] == exact_counts(v, HISTOGRAMS[key]), key
        assert (h["min"], h["max"]) == (float(v.min()), float(v.max())), key
        assert h["sum"] == pytest.approx(v.astype(np.float64).sum(), rel=1e-6), key
        assert h["sumsq"] == pytest.approx((v.astype(np.float64) ** 2).sum(), rel=1e-6), key
    assert clean.histograms.keys() == other.histograms.keys()
    for key, h in clean.histograms.items():
        g = other.histograms[key]
        assert (g["counts"], g["underflow"], g["overflow"], g["min"], g["max"]) == (
            h["counts"], h["underflow"], h["overflow"], h["min"], h["max"]
        ), key  # fmt: skip
        assert (g["sum"], g["sumsq"]) == pytest.approx((h["sum"], h["sumsq"]), rel=1e-6), key
    for key, v in clean.scalars.items():
        assert other.scalars[key] == pytest.approx(v, rel=1e-6, abs=1e-9), key
    assert other.outliers == clean.outliers


def test_per_token_advantages_match_per_sequence_ones() -> None:
    d = batch(seed=5)
    per_token = dict(d, advantages=d["advantages"][:, None].expand_as(d["logp"]).clone())
    for name in ("mhpo", "grpo", "gspo"):
        rows, tokens = run(name, [d]), run(name, [per_token])
        assert rows.histograms.keys() == tokens.histograms.keys(), name
        for key, h in rows.histograms.items():
            assert tokens.histograms[key]["counts"] == h["counts"], (name, key)
        for key, v in rows.scalars.items():
            assert tokens.scalars[key] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, key)
        assert [o["x"] for o in tokens.outliers] == [o["x"] for o in rows.outliers]


def test_update_leaves_its_inputs_and_the_loss_stats_untouched() -> None:
    d = batch(seed=6)
    d["entropy"] = torch.rand(8, 40, generator=torch.Generator().manual_seed(7))
    stats = get_loss("mhpo")(d["logp"], d["old_logp"], d["advantages"], d["mask"]).stats
    before = {k: v.clone() for k, v in d.items()}, {k: v.clone() for k, v in stats.items()}
    acc = DiagnosticsAccumulator("mhpo", {}, top_k=3)
    acc.update(**d, loss_stats=stats)
    acc.update(**d, loss_stats=stats)
    acc.compute()
    for now, then in ((d, before[0]), (stats, before[1])):
        for key, value in then.items():
            assert torch.equal(now[key], value), key


def test_rows_of_one_sign_keep_exact_extremes_and_clip_counts() -> None:
    """Masked tokens have x == 0 on the fast path: rows whose kept x are all > 0, all < 0, all
    0, or none must still give the kept tokens' min/max per advantage sign and clip counts."""
    g = torch.Generator().manual_seed(11)
    b, t = 6, 32
    logp = torch.randn(b, t, generator=g) * 0.5 - 1.5
    step = torch.rand(b, t, generator=g) * 0.4 + 0.05
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 1.0])[:, None]
    old = logp - sign * step  # x = sign * step
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[3] = False  # a row without a kept token
    mask[5, : t // 2] = False  # the masked tokens first
    adv = torch.tensor([1.0, -1.0, 0.0, 1.0, 0.0, 1.0])  # adv_pos: x > 0 only, adv_neg: x < 0 only
    d = {"logp": logp, "old_logp": old, "advantages": adv, "mask": mask}
    stats = run("grpo", [d])
    m = mask.numpy()
    x = (logp - old).double().numpy()
    a = adv[:, None].expand_as(logp).numpy()
    s = stats.scalars
    assert (s["ratio/min"], s["ratio/max"]) == (float(np.float32(x[m].min())), float(np.float32(x[m].max())))
    for key, side in (("log_ratio/adv_pos", a > 0), ("log_ratio/adv_neg", a < 0)):
        h, kept = stats.histograms[key], x[m & side]
        assert (h["min"], h["max"]) == (float(np.float32(kept.min())), float(np.float32(kept.max()))), key
    low = ((x < math.log(0.8)) & (a < 0) & m).sum() / m.sum()
    high = ((x > math.log(1.2)) & (a > 0) & m).sum() / m.sum()
    assert (s["ratio/clip_frac_low"], s["ratio/clip_frac_high"]) == pytest.approx((low, high))
    per_token = dict(d, advantages=adv[:, None].expand_as(logp).clone())  # the masked path
    assert run("grpo", [per_token]).scalars == pytest.approx(s, nan_ok=True)


@pytest.mark.parametrize("repeat", [4, 8])
def test_bin_edges_are_exact_whatever_the_token_count(repeat: int) -> None:
    """CPU counts interleave copies of the bins when the token count allows: both ways are exact."""
    d = on_edges_batch()
    d["old_logp"] = torch.nan_to_num(d["old_logp"], nan=0.0)
    d = {k: v.repeat(1, repeat) if v.dim() == 2 else v for k, v in d.items()}
    stats = run("mhpo", [d])
    m = d["mask"].numpy()
    x = (d["logp"] - d["old_logp"]).numpy()[m]
    h = stats.histograms["log_ratio"]
    assert [h["underflow"], *h["counts"], h["overflow"]] == exact_counts(x, HISTOGRAMS["log_ratio"])
    out = get_loss("mhpo")(**d)
    for key in ("psi", "zeta", "multiplier"):
        v = out.stats[key].numpy()[m]
        h = stats.histograms[key]
        assert [h["underflow"], *h["counts"], h["overflow"]] == exact_counts(v, HISTOGRAMS[key]), key


def test_large_updates_count_psi_zeta_multiplier_jointly_and_match_small_ones() -> None:
    """Updates of at least `_JOINT` tokens count the three bins with one joint `bincount`; the
    same tokens fed as small micro-batches (one `bincount` each) give the same step."""
    from mhpo.diagnostics import _JOINT

    t = 4096
    b = -(-_JOINT // t) + 2
    g = torch.Generator().manual_seed(12)
    logp = torch.randn(b, t, generator=g) * 0.5 - 1.5
    old = logp + torch.randn(b, t, generator=g) * torch.linspace(0.05, 3.0, b)[:, None]
    d = {
        "logp": logp,
        "old_logp": old,
        "advantages": torch.randn(b, generator=g),
        "mask": torch.rand(b, t, generator=g) > 0.3,
    }
    whole = run("mhpo", [d])
    parts = [{k: v[i : i + 8] for k, v in d.items()} for i in range(0, b, 8)]
    pieces = run("mhpo", parts)
    for key in ("psi", "zeta", "multiplier"):
        h, p = whole.histograms[key], pieces.histograms[key]
        assert (h["counts"], h["underflow"], h["overflow"], h["min"], h["max"]) == (
            p["counts"], p["underflow"], p["overflow"], p["min"], p["max"]
        ), key  # fmt: skip
    assert whole.scalars["grad/vanish_frac"] == pieces.scalars["grad/vanish_frac"]
