"""Per-step trust-region diagnostics (DESIGN 2.2) reduced on the device, one host transfer per step.

    acc = DiagnosticsAccumulator("mhpo", hparams, top_k=8)
    for mb in micro_batches:                      # one optimizer step
        out = loss_fn(mb.logp, mb.old_logp, mb.adv, mb.mask, **hparams)
        acc.update(mb.logp, mb.old_logp, mb.adv, mb.mask, loss_stats=out.stats, entropy=mb.entropy)
    stats = acc.compute()                         # StepStats(scalars, histograms, outliers); resets

`update` only launches device work (no `.item()`, no sync); `compute` merges the
micro-batches, all-reduces across ranks when `torch.distributed` is initialised (or a
`process_group` is given) and copies one packed float64 tensor to the host.

Conventions (decisions the design card leaves open):
- Statistics are over valid (mask) tokens. A NaN log-ratio cannot be ordered or binned:
  it is left out of the histograms, min/max and percentiles, but it makes every mean and
  std NaN and is counted in `ratio/nonfinite_frac` (NaN or +-inf), so it is never hidden.
- Std is the population std (ddof 0), from merged sums and sums of squares.
- Hazard terms are MHPO's (DESIGN 1.1) for every loss, so runs of different losses are
  comparable: the run's own MHPO hyper-parameters when the loss is "mhpo", the paper
  defaults otherwise. `grad/multiplier_*` and the `multiplier` histogram are the active
  loss's own gradient multiplier (`PolicyLoss.multiplier`); for "gspo" it is evaluated at
  the sequence log-ratio, as are its clip fractions (TRL's `clip_ratio` for GSPO).
- `ratio/clip_frac*` use the loss's own clip window; losses without a hard clip ("mhpo",
  "sapo") use GRPO's [1 - 0.2, 1 + 0.2], so the number is comparable to a GRPO run's.
  For "cispo" (no lower clip by default) only the upper side can count.
- Percentiles (linear interpolation, as `torch.quantile`) are exact over all valid,
  non-NaN tokens of the step on one process. Under torch.distributed they are read from
  an all-reduced fine histogram (`QUANTILE_BINS` uniform bins on the range of the
  coarse histogram, interpolated inside a bin and towards the exact global min/max
  outside it), so they are exact to within one fine bin (1/1024 for the log-ratio).
- `ratio/pos_mass`, `neg_mass` and the clip fractions are exact counts; the +-0.1, 0.2, 0.5, 1
  thresholds are bin edges of the 160-bin log-ratio histogram (width 0.025) and are read from
  it: `x < -t` exactly, `x > t` counting an x equal to t (to float32 rounding) as above.
- Histograms whose every bin is empty (for example `log_ratio/adv_neg` in a step without
  a negative advantage) are left out of `StepStats.histograms`.
- `train/loss` is the mean of `loss_stats["loss"]` over the updates (and ranks);
  `policy/length_mean` counts valid tokens per sequence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mhpo.losses import get_loss
from mhpo.losses import mhpo as mhpo_loss
from mhpo.losses._registry import prepare
from mhpo.losses.gspo import sequence_log_ratio

__all__ = [
    "HISTOGRAMS",
    "PERCENTILES",
    "QUANTILE_BINS",
    "THRESHOLDS",
    "DiagnosticsAccumulator",
    "HistSpec",
    "StepStats",
    "compute_step_stats",
]


@dataclass(frozen=True)
class HistSpec:
    """Fixed uniform bins on [lo, hi]; bin i covers [lo + i*w, lo + (i+1)*w), w = (hi - lo) / bins."""

    lo: float
    hi: float
    bins: int


HISTOGRAMS: dict[str, HistSpec] = {
    "log_ratio": HistSpec(-2.0, 2.0, 160),
    "log_ratio/adv_pos": HistSpec(-2.0, 2.0, 160),
    "log_ratio/adv_neg": HistSpec(-2.0, 2.0, 160),
    "psi": HistSpec(-2.0, 2.0, 64),
    "zeta": HistSpec(0.0, 8.0, 64),
    "multiplier": HistSpec(0.0, 5.0, 64),
}
THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)  # edges of the log-ratio bins (width 0.025)
PERCENTILES: dict[str, float] = {"p01": 0.01, "p05": 0.05, "p50": 0.50, "p95": 0.95, "p99": 0.99}
QUANTILE_BINS = 4096
_X_SPEC = HISTOGRAMS["log_ratio"]
assert all(
    math.isclose(((s * t - _X_SPEC.lo) * _X_SPEC.bins / (_X_SPEC.hi - _X_SPEC.lo)) % 1, 0, abs_tol=1e-9)
    for t in THRESHOLDS
    for s in (1, -1)
), "every +-threshold must be a bin edge of the log-ratio histogram"
VANISH = 0.01
DEFAULT_CLIP = (math.log(0.8), math.log(1.2))

# Sums per update, packed in this order (float64).
_SUMS = (
    "n_valid", "n_tokens", "n_seq", "entropy_sum", "entropy_n", "k3_sum", "logp_sum", "loss_sum", "loss_n",
    "zeta_pos_sum", "zeta_neg_sum", "survival_sum", "vanish_n", "clip_low_n", "clip_high_n",
    "pos_n", "neg_n", "inf_n",
)  # fmt: skip
_X_CLASSES = 4  # advantage > 0, < 0, == 0, and a dump group for masked / NaN tokens
_SIGNS = 3  # the log-ratio histogram's copies: advantage > 0, < 0, == 0
_OTHER = ("psi", "zeta", "multiplier")


class StepStats(NamedTuple):
    """One optimizer step's statistics: C1 shapes, ready for `Run.log`."""

    scalars: dict[str, float]
    histograms: dict[str, dict[str, Any]]
    outliers: list[dict[str, Any]]


def _hist(v: Tensor, spec: HistSpec, not_ok: Tensor, copies: int = 1, copy: Tensor | None = None) -> Tensor:
    """float64 counts of `v` where not `not_ok`: per copy, underflow, the bins, overflow.

    One `histc` pass, no index tensor: under/overflow are clamped into the half-bins just
    outside [lo, hi], the tokens to leave out are set to NaN (which histc skips), and `copy`
    (broadcastable to v, values 0..copies-1) shifts each token into its copy's range (the
    log-ratio split by advantage sign).
    """
    width = (spec.hi - spec.lo) / spec.bins
    span = (spec.bins + 2) * width
    t = v.clamp(spec.lo - width / 2, spec.hi + width / 2)
    if copy is not None:
        t.add_(copy * span)
    t.masked_fill_(not_ok, math.nan)
    lo = spec.lo - width
    return torch.histc(t, bins=copies * (spec.bins + 2), min=lo, max=lo + copies * span).double()


def _moments(v_ok: Tensor, not_ok: Tensor, group: Tensor, groups: int) -> Tensor:
    """(4, groups) float64: sum, sum of squares, min, max of `v_ok` per group.

    `v_ok` (B, T) is 0 where `not_ok`; `group` is (B,) (one group per row, as for per-sequence
    advantages: rows are reduced first, then the B row values) or (B, T).
    """
    lo_fill = v_ok.masked_fill(not_ok, math.inf)
    hi_fill = v_ok.masked_fill(not_ok, -math.inf)
    if group.dim() == 1:
        vals = (v_ok.sum(1), (v_ok * v_ok).sum(1), lo_fill.amin(1), hi_fill.amax(1))
        g = group
    else:
        vals = (v_ok.reshape(-1), (v_ok * v_ok).reshape(-1), lo_fill.reshape(-1), hi_fill.reshape(-1))
        g = group.reshape(-1)
    out = torch.zeros(4, groups, dtype=v_ok.dtype, device=v_ok.device)
    out[2].fill_(math.inf)
    out[3].fill_(-math.inf)
    out[0].scatter_add_(0, g, vals[0])
    out[1].scatter_add_(0, g, vals[1])
    out[2].scatter_reduce_(0, g, vals[2], "amin")
    out[3].scatter_reduce_(0, g, vals[3], "amax")
    return out.double()


def _ok_moments(v_ok: Tensor, not_ok: Tensor, ref: Tensor) -> Tensor:
    """(4,) float64 sum, sum of squares, min, max of `v_ok` (0 where `not_ok`) over the ok tokens.

    `ref` is the flat index of an ok token: filling the others with its value leaves min and
    max unchanged, so one fill and one `aminmax` give both.
    """
    flat = v_ok.reshape(-1)
    lo, hi = torch.aminmax(torch.where(not_ok.reshape(-1), flat.index_select(0, ref), flat))
    return torch.stack([flat.sum(), torch.dot(flat, flat), lo, hi]).double()


class _Update(NamedTuple):
    sums: Tensor  # (len(_SUMS),)
    x_counts: Tensor  # (_SIGNS * (bins + 2),)
    x_moments: Tensor  # (4, _X_CLASSES)
    other_counts: Tensor  # concatenated psi, zeta, multiplier bins (each bins + 2), ok tokens only
    other_moments: Tensor  # (3, 4) sum, sumsq, min, max of psi, zeta, multiplier
    outliers: Tensor  # (k, 7): score, x, A, zeta, sample, position, token_id
    x: Tensor  # (B, T) for the percentiles
    zeta: Tensor  # (B, T)
    ok: Tensor  # (B, T) valid and x not NaN


class DiagnosticsAccumulator:
    """Accumulates one optimizer step's per-token tensors (micro-batch by micro-batch) on the device.

    `loss_name` and `hparams` are those of the run's loss (validated by the registry);
    `top_k` outlier tokens by |x| are kept. `compute()` returns the step's `StepStats` and
    starts a new step.
    """

    def __init__(self, loss_name: str, hparams: Mapping[str, float | None] | None = None, top_k: int = 8) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k={top_k!r} must be an int >= 0")
        self.loss = get_loss(loss_name)
        self.hparams = self.loss.resolve(**dict(hparams or {}))
        self.hazard_hparams = self.hparams if loss_name == "mhpo" else mhpo_loss.DEFAULTS
        bounds = self.loss.clip_bounds(**self.hparams)
        self.clip = DEFAULT_CLIP if bounds is None or loss_name == "sapo" else bounds
        self.top_k = top_k
        self._updates: list[_Update] = []
        self._samples = 0

    def reset(self) -> None:
        """Forget the micro-batches seen since the last `compute()`."""
        self._updates.clear()
        self._samples = 0

    @torch.no_grad()
    def update(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        loss_stats: Mapping[str, Tensor] | None = None,
        entropy: Tensor | None = None,
        token_ids: Tensor | None = None,
    ) -> None:
        """Add one micro-batch: `logp`, `old_logp`, `mask`, `entropy`, `token_ids` (B, T);
        `advantages` (B,) or (B, T); `loss_stats` the `LossOutput.stats` of this micro-batch.
        """
        for name, t in (("entropy", entropy), ("token_ids", token_ids)):
            if t is not None and tuple(t.shape) != tuple(logp.shape):
                raise ValueError(f"{name} has shape {tuple(t.shape)} but logp has shape {tuple(logp.shape)}")
        inp = prepare(logp.detach(), old_logp.detach(), advantages.detach(), mask)
        x, adv, valid = inp.x, inp.adv, inp.mask
        stats = dict(loss_stats or {})
        not_ok = torch.isnan(x).logical_or_(~valid)  # masked, or a NaN log-ratio
        ok = ~not_ok
        dtype, device = x.dtype, x.device
        valid_f = valid.to(dtype).reshape(-1)
        x_ok = x.masked_fill(not_ok, 0.0)

        if self.loss.name == "mhpo" and {"psi", "zeta", "zeta_pos", "zeta_neg"} <= stats.keys():
            psi, zeta, zeta_pos, zeta_neg = stats["psi"], stats["zeta"], stats["zeta_pos"], stats["zeta_neg"]
        else:
            _, psi, zeta_pos, zeta_neg = mhpo_loss.hazard(x, self.hazard_hparams)
            zeta = zeta_pos + zeta_neg
        clip_x = x
        if self.loss.name == "gspo":
            seq = stats["seq_log_ratio"] if "seq_log_ratio" in stats else sequence_log_ratio(x, valid)
            clip_x = seq.to(dtype).unsqueeze(-1).expand_as(x)
        mult = stats["multiplier"] if "multiplier" in stats else self.loss.multiplier(clip_x, adv, **self.hparams)
        mult = mult.to(dtype)

        # Log-ratio: one class index (A > 0, A < 0, A == 0, dump) drives every x reduction.
        a = advantages.detach()
        a_cls = (a < 0).to(torch.int64) + 2 * (a == 0).to(torch.int64)
        row_cls = a.dim() == 1  # per-sequence advantages: reduce rows first, then the B row values
        spec = HISTOGRAMS["log_ratio"]
        copy = a_cls.to(dtype).unsqueeze(-1) if row_cls else a_cls.to(dtype)
        x_counts = _hist(x_ok, spec, not_ok, _SIGNS, copy)
        x_moments = _moments(x_ok, not_ok, a_cls if row_cls else a_cls.masked_fill(not_ok, _X_CLASSES - 1), _X_CLASSES)

        ref = torch.argmax(ok.reshape(-1).to(torch.uint8)).reshape(1)  # an ok token, if there is one
        other_counts, other_moments, zeroed = [], [], {}
        for name, v in (("psi", psi), ("zeta", zeta), ("multiplier", mult)):
            spec_v = HISTOGRAMS[name]
            zeroed[name] = v_ok = v.to(dtype).masked_fill(not_ok, 0.0)
            other_counts.append(_hist(v_ok, spec_v, not_ok))
            other_moments.append(_ok_moments(v_ok, not_ok, ref))

        zero = torch.zeros((), dtype=torch.float64, device=device)
        n_valid = valid.sum().double()
        # Exact counts the bins cannot give; x_ok is 0 on not-ok tokens, which no test below counts.
        lo, hi = self.clip
        if self.loss.name == "gspo":
            clip_low = ((clip_x < lo) & (adv < 0) & ok).sum().double()
            clip_high = ((clip_x > hi) & (adv > 0) & ok).sum().double()
        elif row_cls:
            clip_low = torch.dot(torch.count_nonzero(x_ok < lo, dim=1).double(), (a < 0).double())
            clip_high = torch.dot(torch.count_nonzero(x_ok > hi, dim=1).double(), (a > 0).double())
        else:
            clip_low = ((x_ok < lo) & (adv < 0)).sum().double()
            clip_high = ((x_ok > hi) & (adv > 0)).sum().double()
        ent_sum, ent_n = zero, zero
        if entropy is not None:
            ent_sum = torch.where(valid, entropy.to(dtype), 0.0).sum().double()
            ent_n = n_valid
        loss_sum, loss_n = zero, zero
        if "loss" in stats:
            loss_sum, loss_n = stats["loss"].detach().double().reshape(()), torch.ones_like(zero)
        sums = torch.stack(
            [
                n_valid,
                torch.full((), float(x.numel()), dtype=torch.float64, device=device),
                torch.full((), float(x.shape[0]), dtype=torch.float64, device=device),
                ent_sum,
                ent_n,
                # x is 0 on masked tokens, so these terms are finite there: a dot with the mask sums them.
                torch.dot(torch.expm1(x).sub_(x).reshape(-1), valid_f).double(),
                torch.where(valid, inp.logp, 0.0).sum().double(),
                loss_sum,
                loss_n,
                torch.dot(zeta_pos.reshape(-1).to(dtype), valid_f).double(),
                torch.dot(zeta_neg.reshape(-1).to(dtype), valid_f).double(),
                torch.dot(torch.exp(-zeta.to(dtype)).reshape(-1), valid_f).double(),
                # 0 on the not-ok tokens, so they count here; _assemble() takes their number back out.
                torch.count_nonzero(zeroed["multiplier"] < VANISH).double(),
                clip_low,
                clip_high,
                torch.count_nonzero(x_ok > 0).double(),
                torch.count_nonzero(x_ok < 0).double(),
                torch.count_nonzero(torch.isinf(x_ok)).double(),
            ]
        )
        outliers = self._outliers(x, adv, zeta, valid, token_ids)
        self._samples += x.shape[0]
        self._updates.append(
            _Update(
                sums,
                x_counts,
                x_moments,
                torch.cat(other_counts),
                torch.stack(other_moments),
                outliers,
                x,
                zeta.to(dtype),
                ok,
            )
        )

    def _outliers(self, x: Tensor, adv: Tensor, zeta: Tensor, valid: Tensor, token_ids: Tensor | None) -> Tensor:
        """(k, 7) rows of the top-|x| valid tokens (NaN first); score -1 marks padding rows."""
        b, t = x.shape
        k = min(self.top_k, b * t)
        score = torch.where(valid, x.abs(), -1.0).reshape(-1)
        if score.is_cuda:
            top, flat = torch.topk(score, k)
        else:  # CPU: a per-row top-k then a global one is several times faster than one flat top-k
            row_top, row_idx = torch.topk(score.view(b, t), min(k, t), dim=1)
            top, pick = torch.topk(row_top.reshape(-1), k)
            flat = (pick // min(k, t)) * t + row_idx.reshape(-1)[pick]
        ids = token_ids.reshape(-1)[flat].double() if token_ids is not None else torch.full_like(top, -1.0).double()
        return torch.stack(
            [
                top.double(),
                x.reshape(-1)[flat].double(),
                adv.reshape(-1)[flat].double(),
                zeta.reshape(-1)[flat].double(),
                (flat // t + self._samples).double(),
                (flat % t).double(),
                ids,
            ],
            dim=1,
        )

    @torch.no_grad()
    def compute(self, process_group: Any = None) -> StepStats:
        """Merge the updates (and ranks), transfer once, return the step's `StepStats`; then reset."""
        if not self._updates:
            raise RuntimeError("compute() called before any update(); feed each micro-batch with update() first")
        ups = self._updates
        sums = torch.stack([u.sums for u in ups]).sum(0)
        x_counts = torch.stack([u.x_counts for u in ups]).sum(0)
        other_counts = torch.stack([u.other_counts for u in ups]).sum(0)
        x_m = torch.stack([u.x_moments for u in ups])
        o_m = torch.stack([u.other_moments for u in ups])
        x_moments = torch.stack([x_m[:, 0].sum(0), x_m[:, 1].sum(0), x_m[:, 2].amin(0), x_m[:, 3].amax(0)])
        o_moments = torch.stack([o_m[:, :, 0].sum(0), o_m[:, :, 1].sum(0), o_m[:, :, 2].amin(0), o_m[:, :, 3].amax(0)], 1)
        outliers = torch.cat([u.outliers for u in ups])
        x_all = torch.cat([u.x.reshape(-1) for u in ups])
        zeta_all = torch.cat([u.zeta.reshape(-1) for u in ups])
        ok_all = torch.cat([u.ok.reshape(-1) for u in ups])

        distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
        if distributed:
            additive = [sums, x_counts, other_counts, x_moments[:2].reshape(-1), o_moments[:, :2].reshape(-1)]
            x_fine = self._fine_hist(x_all, ok_all, HISTOGRAMS["log_ratio"])
            z_fine = self._fine_hist(zeta_all, ok_all, HISTOGRAMS["zeta"])
            additive += [x_fine, z_fine]
            flat_sum = torch.cat(additive)
            dist.all_reduce(flat_sum, op=dist.ReduceOp.SUM, group=process_group)
            extremes = torch.cat([-x_moments[2], x_moments[3], -o_moments[:, 2], o_moments[:, 3]])
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=process_group)
            parts = list(torch.split(flat_sum, [t.numel() for t in additive]))
            sums, x_counts, other_counts = parts[:3]
            nx, no = x_moments.shape[1], o_moments.shape[0]
            x_moments = torch.stack([*parts[3].view(2, nx), -extremes[:nx], extremes[nx : 2 * nx]])
            o_moments = torch.stack(
                [*parts[4].view(no, 2).T, -extremes[2 * nx : 2 * nx + no], extremes[2 * nx + no :]], 1
            )
            x_min, x_max = x_moments[2, :3].amin(), x_moments[3, :3].amax()
            x_q = _quantiles_from_hist(parts[5], HISTOGRAMS["log_ratio"], x_min, x_max, list(PERCENTILES.values()))
            z_q = _quantiles_from_hist(parts[6], HISTOGRAMS["zeta"], o_moments[1, 2], o_moments[1, 3], [0.99])
            outliers = self._gather_outliers(outliers, process_group)
        else:
            x_q = _exact_quantiles(x_all, ok_all, list(PERCENTILES.values()))
            z_q = _exact_quantiles(zeta_all, ok_all, [0.99])
        k = min(self.top_k, outliers.shape[0])
        outliers = outliers[torch.topk(outliers[:, 0], k).indices] if k else outliers[:0]

        packed = [sums, x_counts, other_counts, x_moments.reshape(-1), o_moments.reshape(-1), x_q, z_q]
        host = torch.cat([p.double().reshape(-1) for p in packed] + [outliers.reshape(-1)]).cpu().numpy()
        self.reset()
        return self._assemble(host, [p.numel() for p in packed])

    @staticmethod
    def _fine_hist(v: Tensor, ok: Tensor, spec: HistSpec) -> Tensor:
        return _hist(v, HistSpec(spec.lo, spec.hi, QUANTILE_BINS), ~ok)

    def _gather_outliers(self, outliers: Tensor, group: Any) -> Tensor:
        """All ranks' candidates, sample indices offset by the samples of the ranks before."""
        world = dist.get_world_size(group)
        local = outliers[torch.topk(outliers[:, 0], min(self.top_k, outliers.shape[0])).indices]
        padded = torch.full((self.top_k, 7), -1.0, dtype=torch.float64, device=outliers.device)
        padded[: local.shape[0]] = local
        rows = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(rows, padded, group=group)
        counts = torch.tensor([float(self._samples)], dtype=torch.float64, device=outliers.device)
        all_counts = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts, group=group)
        offsets = torch.cumsum(torch.cat([torch.zeros_like(counts), *all_counts[:-1]]), 0)
        for r in range(world):
            rows[r][:, 4] += offsets[r]
        return torch.cat(rows)

    def _assemble(self, host: np.ndarray, sizes: list[int]) -> StepStats:
        """Host-side arithmetic on the transferred numbers: scalars, C1 histograms, outliers."""
        parts, at = [], 0
        for n in sizes:
            parts.append(host[at : at + n])
            at += n
        sums_a, x_counts, other_counts, x_mom, o_mom, x_q, z_q = parts
        outlier_rows = host[at:].reshape(-1, 7)
        s = dict(zip(_SUMS, sums_a.tolist(), strict=True))
        n = s["n_valid"]
        spec = HISTOGRAMS["log_ratio"]
        xc = x_counts.reshape(_SIGNS, spec.bins + 2)
        x_mom = x_mom.reshape(4, _X_CLASSES)
        n_ok = float(xc[:3].sum())
        has_nan = n > n_ok

        def ratio(num: float, den: float) -> float:
            return num / den if den > 0 else math.nan

        def mean_std(total: float, sq: float, cnt: float) -> tuple[float, float]:
            if has_nan or cnt == 0:
                return math.nan, math.nan
            mean = float(total) / float(cnt)
            var = float(sq) / float(cnt) - mean * mean
            return mean, math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan

        scalars: dict[str, float] = {}
        sx, sqx = float(x_mom[0, :3].sum()), float(x_mom[1, :3].sum())
        x_mean, x_std = mean_std(sx, sqx, n_ok)
        scalars["ratio/mean"], scalars["ratio/std"] = x_mean, x_std
        scalars["ratio/min"] = float(x_mom[2, :3].min()) if n_ok else math.nan
        scalars["ratio/max"] = float(x_mom[3, :3].max()) if n_ok else math.nan
        for (name, _), value in zip(PERCENTILES.items(), x_q.tolist(), strict=True):
            scalars[f"ratio/{name}"] = value

        # Thresholds are bin edges of the log-ratio histogram: x < -t is exact (bins are
        # half-open), x > t counts x == t as above (a tie at a float threshold).
        merged = xc[:3].sum(0)
        below = np.cumsum(merged)  # below[i]: values in the cells left of edge i (cell 0 is underflow)

        def n_below(t: float) -> float:
            return float(below[round((t - spec.lo) * spec.bins / (spec.hi - spec.lo))])

        scalars["ratio/pos_mass"] = ratio(s["pos_n"], n)
        scalars["ratio/neg_mass"] = ratio(s["neg_n"], n)
        for t in THRESHOLDS:
            scalars[f"ratio/frac_above_{t:g}"] = ratio(n_ok - n_below(t), n)
            scalars[f"ratio/frac_below_{t:g}"] = ratio(n_below(-t), n)
        low, high = s["clip_low_n"], s["clip_high_n"]
        scalars["ratio/clip_frac"] = ratio(low + high, n)
        scalars["ratio/clip_frac_low"] = ratio(low, n)
        scalars["ratio/clip_frac_high"] = ratio(high, n)
        scalars["ratio/nonfinite_frac"] = ratio(n - n_ok + s["inf_n"], n)

        o_mom = o_mom.reshape(len(_OTHER), 4)
        offsets = np.cumsum([0] + [HISTOGRAMS[k].bins + 2 for k in _OTHER])
        other = {}
        for i, key in enumerate(_OTHER):
            spec_o = HISTOGRAMS[key]
            other[key] = other_counts[offsets[i] : offsets[i] + spec_o.bins + 2]
        z_mean, _ = mean_std(o_mom[1, 0], o_mom[1, 1], n_ok)
        nan_or = (lambda v: math.nan if has_nan else v)  # noqa: E731
        scalars["hazard/zeta_mean"] = z_mean
        scalars["hazard/zeta_p99"] = float(z_q[0])
        scalars["hazard/zeta_pos_mean"] = nan_or(ratio(s["zeta_pos_sum"], n))
        scalars["hazard/zeta_neg_mean"] = nan_or(ratio(s["zeta_neg_sum"], n))
        scalars["hazard/survival_mean"] = nan_or(ratio(s["survival_sum"], n))
        m_mean, _ = mean_std(o_mom[2, 0], o_mom[2, 1], n_ok)
        scalars["grad/multiplier_mean"] = m_mean
        scalars["grad/multiplier_min"] = float(o_mom[2, 2]) if n_ok else math.nan
        scalars["grad/multiplier_max"] = float(o_mom[2, 3]) if n_ok else math.nan
        scalars["grad/vanish_frac"] = ratio(s["vanish_n"] - (s["n_tokens"] - n_ok), n)
        if s["entropy_n"] > 0:
            scalars["policy/entropy"] = s["entropy_sum"] / s["entropy_n"]
        scalars["policy/kl_k1"] = -x_mean
        scalars["policy/kl_k3"] = ratio(s["k3_sum"], n)
        scalars["policy/logp_mean"] = ratio(s["logp_sum"], n)
        scalars["policy/length_mean"] = ratio(n, s["n_seq"])
        if s["loss_n"] > 0:
            scalars["train/loss"] = s["loss_sum"] / s["loss_n"]

        histograms: dict[str, dict[str, Any]] = {}
        for key, counts, mom in (
            ("log_ratio", xc[:3].sum(0), (x_mom[0, :3].sum(), x_mom[1, :3].sum(), x_mom[2, :3].min(), x_mom[3, :3].max())),
            ("log_ratio/adv_pos", xc[0], tuple(x_mom[:, 0])),
            ("log_ratio/adv_neg", xc[1], tuple(x_mom[:, 1])),
            *((k, other[k], tuple(o_mom[i])) for i, k in enumerate(_OTHER)),
        ):
            hist = _c1_histogram(HISTOGRAMS[key], counts, mom)
            if hist is not None:
                histograms[key] = hist

        outliers = [
            {
                "sample": int(r[4]),
                "position": int(r[5]),
                "token_id": None if r[6] < 0 else int(r[6]),
                "text": "",
                "x": float(r[1]),
                "A": float(r[2]),
                "zeta": float(r[3]),
            }
            for r in outlier_rows
            if not r[0] < 0  # NaN scores (NaN log-ratios) are kept, padding (-1) is not
        ]
        return StepStats(scalars=scalars, histograms=histograms, outliers=outliers)


def _c1_histogram(spec: HistSpec, counts: np.ndarray, mom: tuple[float, ...]) -> dict[str, Any] | None:
    """C1 histogram dict from (bins + 2) counts (underflow, bins..., overflow) and (sum, sumsq, min, max)."""
    total = float(counts.sum())
    if total == 0:
        return None
    ints = [int(round(c)) for c in counts.tolist()]
    return {
        "lo": spec.lo,
        "hi": spec.hi,
        "counts": ints[1:-1],
        "underflow": ints[0],
        "overflow": ints[-1],
        "min": float(mom[2]),
        "max": float(mom[3]),
        "sum": float(mom[0]),
        "sumsq": float(mom[1]),
    }


def _exact_quantiles(v: Tensor, ok: Tensor, qs: list[float]) -> Tensor:
    """Linear-interpolated quantiles of v[ok] (as torch.quantile), NaN when empty.

    CUDA: a sort with device-side indices (no sync). CPU: one numpy multi-kth partition,
    several times faster than a sort there.
    """
    if v.is_cuda:
        return _quantiles_by_sort(v, ok, qs)
    vals = v.numpy()[ok.numpy()]
    n = vals.size
    if n == 0:
        return torch.full((len(qs),), math.nan, dtype=torch.float64)
    positions = [q * (n - 1) for q in qs]
    kth = sorted({math.floor(p) for p in positions})
    part = np.partition(vals, kth)
    # After the partition each kth element is in place and the ones after it are larger, so the
    # next order statistic is the least of the stretch up to the next kth.
    bounds = dict(zip(kth, [*kth[1:], n - 1], strict=True))
    out = []
    for p in positions:
        k = math.floor(p)
        lo = float(part[k])
        hi = float(part[k + 1 : bounds[k] + 1].min()) if p > k else lo
        out.append(lo if lo == hi else lo + (hi - lo) * (p - k))
    return torch.tensor(out, dtype=torch.float64)


def _quantiles_by_sort(v: Tensor, ok: Tensor, qs: list[float]) -> Tensor:
    """Sync-free exact quantiles: sort with +inf padding, gather at device-computed positions."""
    flat = torch.where(ok, v, math.inf).reshape(-1).double()
    ordered = torch.sort(flat).values
    n = ok.sum().double()
    q = torch.tensor(qs, dtype=torch.float64, device=v.device)
    pos = q * (n - 1).clamp(min=0)
    lo_i, hi_i = pos.floor().long(), pos.ceil().long()
    lo, hi = ordered[lo_i], ordered[hi_i]
    out = torch.where(lo == hi, lo, lo + (hi - lo) * (pos - lo_i.double()))
    return torch.where(n > 0, out, math.nan)


def _quantiles_from_hist(counts: Tensor, spec: HistSpec, vmin: Tensor, vmax: Tensor, qs: list[float]) -> Tensor:
    """Quantiles from a fine histogram (underflow, bins..., overflow), as linear interpolation
    between order statistics, each placed at its midpoint rank inside its cell.

    Every estimated order statistic lies in the right cell, so the result is within one
    cell of the exact quantile; under/overflow cells span the exact global min/max.
    """
    bins = counts.numel() - 2
    width = (spec.hi - spec.lo) / bins
    dev = counts.device
    edges = torch.arange(bins + 1, dtype=torch.float64, device=dev) * width + spec.lo
    left = torch.cat([torch.minimum(vmin.double(), edges[0]).reshape(1), edges])
    right = torch.cat([edges, torch.maximum(vmax.double(), edges[-1]).reshape(1)])
    c = counts.double()
    cum = torch.cumsum(c, 0)
    n = cum[-1]

    def order_stat(rank: Tensor) -> Tensor:  # 0-based rank -> estimated value
        cell = torch.searchsorted(cum, rank + 1).clamp(max=bins + 1)
        before = torch.where(cell > 0, cum[(cell - 1).clamp(min=0)], 0.0)
        j = rank + 1 - before
        return left[cell] + (right[cell] - left[cell]) * (j - 0.5) / c[cell].clamp(min=1)

    pos = torch.tensor(qs, dtype=torch.float64, device=dev) * (n - 1).clamp(min=0)
    lo_r = pos.floor()
    hi_r = torch.minimum(lo_r + 1, (n - 1).clamp(min=0))
    lo_v, hi_v = order_stat(lo_r), order_stat(hi_r)
    out = torch.where(lo_v == hi_v, lo_v, lo_v + (hi_v - lo_v) * (pos - lo_r))
    return torch.where(n > 0, out, math.nan)


def compute_step_stats(
    loss_name: str,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    hparams: Mapping[str, float | None] | None = None,
    loss_stats: Mapping[str, Tensor] | None = None,
    entropy: Tensor | None = None,
    token_ids: Tensor | None = None,
    top_k: int = 8,
    process_group: Any = None,
) -> StepStats:
    """One-shot `DiagnosticsAccumulator` for a step held in one batch (TRL callbacks, custom loops)."""
    acc = DiagnosticsAccumulator(loss_name, hparams, top_k=top_k)
    acc.update(logp, old_logp, advantages, mask, loss_stats=loss_stats, entropy=entropy, token_ids=token_ids)
    return acc.compute(process_group=process_group)
