"""Per-step trust-region diagnostics (the README's metric table) reduced on the device, one host transfer per step.

    acc = DiagnosticsAccumulator("mhpo", hparams, top_k=8)
    for mb in micro_batches:                      # one optimizer step
        out = loss_fn(mb.logp, mb.old_logp, mb.adv, mb.mask, **hparams)
        acc.update(mb.logp, mb.old_logp, mb.adv, mb.mask, loss_stats=out.stats, entropy=mb.entropy)
    stats = acc.compute()                         # StepStats(scalars, histograms, outliers); resets

`update` only launches device work (no `.item()`, no sync, on a CUDA device); `compute`
merges the micro-batches, all-reduces across ranks when `torch.distributed` is initialised
(or a `process_group` is given) and copies one packed float64 tensor to the host.

Conventions (decisions made here):
- Statistics are over valid (mask) tokens. A NaN log-ratio cannot be ordered or binned:
  it is left out of the histograms, min/max and percentiles, but it makes every mean and
  std NaN and is counted in `ratio/nonfinite_frac` (NaN or +-inf), so it is never hidden.
- Std is the population std (ddof 0), from merged sums and sums of squares.
- Hazard terms are MHPO's (arXiv 2603.16929) for every loss, so runs of different losses are
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
- Bin edges are exact (`lo + i * w` as real numbers, not rounded floats) for float32,
  bfloat16 and float16 inputs: the bin index is `floor(v * p / q)` for the integers
  p / q = bins / (hi - lo), computed where that product is exact. Float64 inputs are
  binned in float64 arithmetic.
- `ratio/pos_mass`, `neg_mass`, `frac_above_*` and `frac_below_*` are exact counts of
  `x > 0`, `x < 0`, `x > t` and `x < -t` (t the float in `THRESHOLDS`, compared exactly):
  0 and +-0.1, 0.2, 0.5, 1 are edges of the 160-bin log-ratio histogram (width 0.025), so
  the counts are read from the bins; as a bin holds the values on its left edge, "x > t"
  also takes out the values equal to t, counted with the percentiles.
- Histograms whose every bin is empty (for example `log_ratio/adv_neg` in a step without
  a negative advantage) are left out of `StepStats.histograms`.
- `train/loss` is the mean of `loss_stats["loss"]` over the updates (and ranks);
  `policy/length_mean` counts valid tokens per sequence.
- `policy/cov_logp_adv` = mean over the step's valid tokens of (A - mean A)(logp - mean logp),
  logp the current policy's log-prob of the sampled token, and `policy/corr_logp_adv` the same
  divided by std A * std logp (Pearson, clamped to [-1, 1]): Cui et al. 2025 (arXiv 2505.22617,
  "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models") show that
  the entropy change of a policy-gradient step follows this covariance, so a positive value
  (confident tokens rewarded) means entropy is being spent. Both come from float64 sums of A,
  A^2, A logp, logp and logp^2 merged over micro-batches and ranks; both are 0.0 (not NaN) when
  A or logp is constant over the step (a std under 1e-6 of its root mean square), as in a step
  whose groups are all degenerate.
- Sampler vs trainer (only with `rollout_logp`, the sampling engine's log-prob of each sampled
  token; without it nothing below is computed): d = old_logp - rollout_logp and w = exp(d) with
  d clamped to +-20, over the valid tokens whose d is not NaN (an engine may give no log-prob
  for a token: TRL stores NaN there; those are counted in `mismatch/unscored_frac`, not
  averaged). `mismatch/abs_mean`, `abs_max`, `kl_k1` = mean(-d) (KL(sampler || trainer) on the
  sampled tokens), `kl_k3` = mean(w - d - 1), `is_mean/min/max/std` of w, `ess` = (sum w)^2 /
  (N sum w^2), `chi2` = mean(w^2) - 1, `seq_log_max` = max over sequences of sum_t d,
  `prob_abs_mean/max` of |exp(old_logp) - exp(rollout_logp)| (verl's `rollout_probs_diff`), the
  `mismatch` histogram of d on [-1, 1], and mean |d| by the trainer's probability of the
  token (`mismatch/abs_mean_p_lt_0.01`, `_p_0.01_0.1`, `_p_ge_0.1`; a bucket without tokens
  has no key). Moments are float64 sums of w - 1, so values near w = 1 lose nothing.

How the reduction stays cheap (it runs every step, next to the loss, and is bound by memory
traffic): every histogram is one `bincount` (a `histc` on CUDA) of an exact bin index built
by a few in-place passes, and the sign and threshold counts come from the log-ratio's bins;
min/max are plain reductions with +-inf put on the tokens to leave out; percentiles are
single-kth partitions of the kept values (sorts on CUDA); big temporaries share a few
buffers. On the CPU a micro-batch whose values are all finite (checked with sums it needs
anyway) skips the NaN handling: masking is a product there, and one copy of psi / zeta / the
multiplier with a kept token's value on the masked tokens serves min, max and the bins. The
outliers are searched in the rows with the largest |x| only. CPU only (each needs values on
the host, a sync on CUDA, whose path is unchanged): with per-sequence advantages the row
min/max of x need no masking pass (see `update`), the clip and vanishing counts are numpy
compare-and-counts, `bincount` interleaves copies of its counters (see `_count`), big updates
count psi, zeta and the multiplier with one joint `bincount`, and tie counts whose cell is
empty are skipped. Exact percentiles stay partitions: copying out the values of the few cells
that hold them (the histogram-guided way) costs as much as the partitions here, as the cells'
values are scattered among the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mhpo.losses import get_loss
from mhpo.losses import mhpo as mhpo_loss
from mhpo.losses._registry import check_inputs, compute_dtype
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
    "grad_norm_after_clip",
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
    "mismatch": HistSpec(-1.0, 1.0, 80),
}
THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)  # edges of the log-ratio bins (width 0.025)
PERCENTILES: dict[str, float] = {"p01": 0.01, "p05": 0.05, "p50": 0.50, "p95": 0.95, "p99": 0.99}
QUANTILE_BINS = 4096
_LANES = 8  # copies of the counts a CPU `bincount` interleaves (see `_count`)
VANISH = 0.01
DEFAULT_CLIP = (math.log(0.8), math.log(1.2))


class _Scale(NamedTuple):
    """Bin index of v = floor(v * p / q) + shift, for integers p, q, shift (exact, see `_scale`)."""

    p: int
    q: int
    shift: int


def _scale(spec: HistSpec) -> _Scale:
    """p / q = bins / (hi - lo) in lowest terms and shift = -lo * p / q, which must be an integer."""
    per_unit = Fraction(spec.bins) / (Fraction(spec.hi) - Fraction(spec.lo))
    shift = -Fraction(spec.lo) * per_unit
    if shift.denominator != 1 or per_unit.numerator >= 2**20 or per_unit.denominator >= 2**20:
        raise ValueError(f"HistSpec {spec}: lo * bins / (hi - lo) must be a small integer for exact bin edges")
    return _Scale(per_unit.numerator, per_unit.denominator, int(shift))


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


_X_SPEC = HISTOGRAMS["log_ratio"]
_X_SCALE = _scale(_X_SPEC)
_X_SLOTS = _X_SPEC.bins + 2  # underflow, bins, overflow
_X_ZERO_SLOT = _X_SCALE.shift + 1  # the bin of x == 0 (and of the tokens left out, whose x is set to 0)
_TIES = (0.0, *THRESHOLDS)  # "x > t" also needs the count of x == t (bins are closed on the left)
_TIE_CELLS = {  # the log-ratio cell (0 underflow) that holds x == t
    t: int((Fraction(t) - Fraction(_X_SPEC.lo)) * _X_SCALE.p / _X_SCALE.q) + 1 for t in _TIES
}
assert all(
    ((s * Fraction(repr(t)) - Fraction(_X_SPEC.lo)) * _X_SCALE.p / _X_SCALE.q).denominator == 1
    for t in THRESHOLDS
    for s in (1, -1)
), "every +-threshold must be a bin edge of the log-ratio histogram"
_OTHER = ("psi", "zeta", "multiplier")
_OTHER_SCALES = tuple(_scale(HISTOGRAMS[k]) for k in _OTHER)
# float32 products v * p are exact when p is a power of two; the division by an odd q then
# rounds, but never across an integer (the distance to one is at least ulp(v * p) / q).
assert all(_is_power_of_two(s.p) for s in _OTHER_SCALES), "psi/zeta/multiplier bins need a power-of-two p"
_DUMP = max(HISTOGRAMS[k].bins for k in _OTHER) + 2  # index offset of the tokens left out
_JOINT = math.prod(HISTOGRAMS[k].bins + 2 for k in _OTHER)  # cells of the joint psi/zeta/multiplier histogram
assert _JOINT < 2**24, "joint bin indices must be exact integers in float32"

# Sums per update, packed in this order (float64).
_SUMS = (
    "n_valid", "n_ok", "n_tokens", "n_seq", "entropy_sum", "entropy_n", "k3_sum", "logp_sum", "loss_sum",
    "loss_n", "zeta_pos_sum", "zeta_neg_sum", "survival_sum", "vanish_n", "clip_low_n", "clip_high_n", "inf_n",
    "adv_sum", "adv_sq_sum", "adv_logp_sum", "logp_sq_sum",
)  # fmt: skip
COV_ZERO_VAR = 1e-12  # a variance under this share of the mean square is rounding: its std counts as 0
_X_CLASSES = 4  # advantage > 0, < 0, == 0, and a dump group for masked / NaN tokens

# Sampler vs trainer (`rollout_logp` given): sums and maxima per update, packed in these orders.
MISMATCH_BUCKETS: tuple[tuple[str, float, float], ...] = (  # key suffix, sampled-token probability range
    ("p_lt_0.01", 0.0, 0.01),
    ("p_0.01_0.1", 0.01, 0.1),
    ("p_ge_0.1", 0.1, 1.0),
)
# u = w - 1, summed instead of w so that moments near w = 1 lose nothing to cancellation
_MM_SUMS = ("valid", "n", "abs", "d", "d2", "k3", "u", "u2", "prob_abs", *(
    f"{part}_{i}" for i in range(len(MISMATCH_BUCKETS)) for part in ("abs", "n")
))  # fmt: skip
_MM_MAX = ("d_max", "neg_d_min", "u_max", "neg_u_min", "seq_max", "prob_abs_max")
_MM_SPEC = HISTOGRAMS["mismatch"]
_MM_SCALE = _scale(_MM_SPEC)
_MM_SLOTS = _MM_SPEC.bins + 2
_MM_BOUND = 20.0  # w = exp(d) with d clamped to +-20, as verl's SAFETY_BOUND
_LOG_EDGES = tuple(math.log(hi) for _, _, hi in MISMATCH_BUCKETS[:-1])
_SIGNS = 3  # the log-ratio histogram's copies: advantage > 0, < 0, == 0


class StepStats(NamedTuple):
    """One optimizer step's statistics: C1 shapes, ready for `Run.log`."""

    scalars: dict[str, float]
    histograms: dict[str, dict[str, Any]]
    outliers: list[dict[str, Any]]


def _as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """0/1 floats of a bool tensor, through uint8 (a direct bool cast is several times slower on CPU)."""
    return mask.view(torch.uint8).to(dtype)


def _hist(v: Tensor, spec: HistSpec, not_ok: Tensor) -> Tensor:
    """float64 counts of `v` where not `not_ok`: underflow, the bins, overflow (one `histc`, no index tensor)."""
    width = (spec.hi - spec.lo) / spec.bins
    t = v.clamp(spec.lo - width / 2, spec.hi + width / 2).masked_fill_(not_ok, math.nan)  # histc skips NaN
    return torch.histc(t, bins=spec.bins + 2, min=spec.lo - width, max=spec.hi + width).double()


def _count(index: Tensor, size: int) -> Tensor:
    """float64 counts of the integer-valued tensor `index` (values in [0, size)); an int16
    `index` is consumed (overwritten).

    CPU: an int16 `bincount` (indices stay below 2**15) over `_LANES` interleaved copies of the
    counts, summed after: consecutive tokens in one bin (the masked tail of a row, a peaked
    log-ratio) would otherwise wait on one counter, which makes a plain `bincount` twice as
    slow. CUDA: `histc` with the integers at the bin centres (`bincount` there reads the
    maximum back to the host, a sync).
    """
    flat = index.reshape(-1)
    if flat.device.type == "cpu":
        small = flat if flat.dtype == torch.int16 else flat.to(torch.int16)
        if small.numel() % _LANES or size * _LANES >= 2**15:
            return torch.bincount(small, minlength=size).double()
        small.view(-1, _LANES).add_(torch.arange(0, size * _LANES, size, dtype=torch.int16))
        return torch.bincount(small, minlength=size * _LANES).view(_LANES, size).sum(0).double()
    return torch.histc(flat, bins=size, min=-0.5, max=size - 0.5).double()  # integers mid-bin


def _x_slots(x_ok: Tensor, offset: Tensor, out: Tensor) -> Tensor:
    """Bin index of each log-ratio (0 underflow, i + 1 bin i, bins + 1 overflow) plus `offset`
    (the class's block). floor(x * p / q) is exact in float64: a float32 times p = 40 fits its
    mantissa. `x_ok` is clamped first (in `out`, same dtype) to just outside [lo, hi], so one
    float64 copy takes the product and the floor; on the CPU the index is then int16 and the
    offset an int16 add (cheaper passes than float64 ones).
    """
    p, q, _ = _X_SCALE
    w = (_X_SPEC.hi - _X_SPEC.lo) / _X_SPEC.bins
    clamped = torch.clamp(x_ok, _X_SPEC.lo - w / 2, _X_SPEC.hi, out=out)  # < lo: underflow, hi: overflow
    y = clamped.to(torch.float64).mul_(p)
    if q != 1:
        y.div_(q)
    y.floor_()
    if y.device.type == "cpu":
        return y.to(torch.int16).add_(offset.to(torch.int16))
    return y.add_(offset)


def _value_slots(v: Tensor, i: int, out: Tensor) -> Tensor:
    """Bin index of `_OTHER[i]` values `v` in `out`: 0 underflow, j + 1 bin j, bins + 1 overflow."""
    sc, bins = _OTHER_SCALES[i], HISTOGRAMS[_OTHER[i]].bins
    torch.mul(v, sc.p, out=out)
    if sc.q != 1:
        out.div_(sc.q)
    return out.floor_().add_(sc.shift + 1).clamp_(0, bins + 1)


def _value_bin(v: float, i: int) -> int:
    """`_value_slots` of one host value, in exact rational arithmetic."""
    sc, bins = _OTHER_SCALES[i], HISTOGRAMS[_OTHER[i]].bins
    return min(max(math.floor(Fraction(v) * sc.p / sc.q) + sc.shift + 1, 0), bins + 1)


def _below(v: Tensor, bound: float, out: Tensor) -> Tensor:
    """-1.0 where v < bound, else 0.0 (`v` without NaN), in `out`: floor(clamp(v - bound, -1, 0)).

    The difference of two floats is 0 only when they are equal, so this is the exact
    comparison, in float passes that run several times faster than a bool compare on CPU.
    """
    return torch.sub(v, bound, out=out).clamp_(-1.0, 0.0).floor_()


def _n_cmp(v: Tensor, bound: float, below: bool, rows: bool = False) -> Tensor:
    """CPU count of v < bound (`below`) or v > bound, per row when `rows`, as a float tensor of
    v's dtype: the bound is rounded to v's dtype, as torch does in `_below` / `_above`. numpy's
    compare-and-count is one pass, several times cheaper than those float passes.
    """
    a = v.numpy()
    hit = a < a.dtype.type(bound) if below else a > a.dtype.type(bound)
    n = np.count_nonzero(hit, axis=1) if rows else np.count_nonzero(hit)
    return torch.as_tensor(np.asarray(n, dtype=a.dtype))


def _above(v: Tensor, bound: float, out: Tensor) -> Tensor:
    """1.0 where v > bound, else 0.0 (`v` without NaN), in `out`; as `_below`."""
    return torch.sub(v, bound, out=out).clamp_(0.0, 1.0).ceil_()


def _group_moments(vals: Tensor, group: Tensor, groups: int) -> Tensor:
    """(4, groups) float64 sum, sum of squares, min, max from per-item partials `vals` (4, M) of `group` (M,)."""
    v = vals.double()
    out = torch.zeros(4, groups, dtype=torch.float64, device=vals.device)
    out[2].fill_(math.inf)
    out[3].fill_(-math.inf)
    out[:2].index_add_(1, group, v[:2])
    out[2].scatter_reduce_(0, group, v[2], "amin")
    out[3].scatter_reduce_(0, group, v[3], "amax")
    return out


class _Update(NamedTuple):
    sums: Tensor  # (len(_SUMS),)
    x_counts: Tensor  # (_SIGNS * _X_SLOTS,)
    x_moments: Tensor  # (4, _X_CLASSES)
    other_counts: Tensor  # concatenated psi, zeta, multiplier bins (each bins + 2), kept tokens only
    other_moments: Tensor  # (3, 4) sum, sumsq, min, max of psi, zeta, multiplier
    outliers: Tensor  # (k, 7): score, x, A, zeta, sample, position, token_id
    x: Tensor  # (B * T,) the log-ratio (for the percentiles and the ties)
    zeta: Tensor  # (B * T,) zeta (for its percentile)
    ok: Tensor  # (B * T,) the tokens kept: valid and x not NaN
    mismatch: (
        tuple[Tensor, Tensor, Tensor] | None
    )  # sums (_MM_SUMS), maxima (_MM_MAX), d's bins; None without rollout_logp


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
        rollout_logp: Tensor | None = None,
    ) -> None:
        """Add one micro-batch: `logp`, `old_logp`, `mask`, `entropy`, `token_ids` (B, T);
        `advantages` (B,) or (B, T); `loss_stats` the `LossOutput.stats` of this micro-batch;
        `rollout_logp` (B, T) the sampling engine's log-prob of each sampled token, which adds the
        `mismatch/*` statistics (give it for every micro-batch of a step, on every rank, or for none).
        """
        for name, given in (("entropy", entropy), ("token_ids", token_ids), ("rollout_logp", rollout_logp)):
            if given is not None and tuple(given.shape) != tuple(logp.shape):
                raise ValueError(f"{name} has shape {tuple(given.shape)} but logp has shape {tuple(logp.shape)}")
        check_inputs(logp, old_logp, advantages, mask)
        if logp.numel() == 0:  # (0, T) or (B, 0): no token; one masked column keeps B rows counted
            self._update_empty(logp, old_logp, advantages, mask, loss_stats, entropy, token_ids, rollout_logp)
            return
        dtype = compute_dtype(logp)
        valid = mask if mask.dtype == torch.bool else mask != 0
        vf = _as_float(valid, dtype)
        flat_vf = vf.reshape(-1)
        logp_c = logp.detach().to(dtype)
        stats = dict(loss_stats or {})
        adv = advantages.detach()
        row_adv = adv.dim() == 1  # per-sequence advantages: reduce rows first, then the B row values
        adv_t = adv.to(dtype).unsqueeze(-1) if row_adv else adv.to(dtype)
        ent = None if entropy is None else entropy.detach().to(dtype)

        # CPU: try the fast path first, where masking is a product and NaN needs no handling;
        # the sums it needs anyway tell (one read-back, free there) whether every value was
        # finite, else the micro-batch is redone with the NaN-safe path (always taken on CUDA).
        clean = False
        x_rows: Tensor | None = None
        dots: list[Tensor] | None = None
        if logp_c.device.type == "cpu":
            x = (logp_c - old_logp.detach().to(dtype)).mul_(vf)
            seq, values, zeta_pos, zeta_neg = self._values(x, valid, adv_t, stats)
            x_rows = x.sum(1)
            dots = [torch.dot(v.reshape(-1), flat_vf) for v in values]
            checks = [x_rows.sum(), *dots] + ([] if ent is None else [torch.dot(ent.reshape(-1), flat_vf)])
            clean = bool(torch.isfinite(torch.stack(checks)).all())
        if not clean:
            x = torch.where(valid, logp_c - old_logp.detach().to(dtype), 0.0)
            seq, values, zeta_pos, zeta_neg = self._values(x, valid, adv_t, stats)
        clip_x = x if seq is None else seq.unsqueeze(-1).expand_as(x)

        # ok: the tokens the histograms, min/max and percentiles keep (valid, x not NaN); x_ok
        # and the value sources are 0 / finite on the others, so every index below is defined.
        if clean:
            assert x_rows is not None and dots is not None  # the CPU pass that found every value finite
            ok, ok_f, x_ok, sources = valid, vf, x, values
        else:
            ok = valid & ~torch.isnan(x)
            ok_f = _as_float(ok, dtype)
            x_ok = torch.nan_to_num(x, nan=0.0, posinf=math.inf, neginf=-math.inf)
            sources = [
                torch.nan_to_num(torch.where(ok, v, 0.0), nan=0.0, posinf=math.inf, neginf=-math.inf) for v in values
            ]
            x_rows = x_ok.sum(1)
            dots = [torch.dot(v.reshape(-1), ok_f.reshape(-1)) for v in sources]
        b, t = x.shape
        device = x.device
        cpu = device.type == "cpu"
        ok_rows = ok_f.sum(1)
        fast_rows = clean and row_adv
        if fast_rows:
            # x is 0 on the masked tokens, so a row's plain min (max) is its kept tokens' one
            # unless it is >= 0 (<= 0) in a row with masked tokens: only those rows (rare past
            # on-policy steps) are redone with the masking. The clip counts compare x itself,
            # the masked zeros taken back out where they count.
            row_min, row_max = x.amin(1), x.amax(1)
            part = (ok_rows < t) & (ok_rows > 0)
            redo = torch.nonzero(part & ((row_min >= 0) | (row_max <= 0))).reshape(-1)
            if redo.numel():
                x_r, pen_r = x[redo], ok_f[redo].reciprocal().sub_(1.0)
                row_min[redo], row_max[redo] = (x_r + pen_r).amin(1), (x_r - pen_r).amax(1)
            empty = ok_rows == 0
            row_min, row_max = row_min.masked_fill(empty, math.inf), row_max.masked_fill(empty, -math.inf)
            scratch, pen = torch.empty_like(x), torch.empty_like(x)  # buffers
            hi_fill = pen
        else:
            pen = ok_f.reciprocal().sub_(1.0)  # 0 on kept tokens, +inf on the others
            hi_fill = x_ok - pen  # -inf on the tokens left out: ready for max and "x > bound"
            scratch = x_ok + pen  # +inf there: ready for min and "x < bound"; then reused
            row_min, row_max = scratch.amin(1), hi_fill.amax(1)
        n_ok = ok_rows.sum()
        lo, hi = self.clip
        zero = torch.zeros((), dtype=dtype, device=device)

        # Log-ratio: one class (A > 0, A < 0, A == 0, dump) per row or token drives its reductions.
        a_cls = (adv < 0).to(torch.int64) + 2 * (adv == 0).to(torch.int64)
        base = _X_SCALE.shift + 1
        clip_low, clip_high = zero, zero
        if fast_rows:
            masked = t - ok_rows
            if seq is None and lo > -math.inf:
                low_rows = _n_cmp(x, lo, True, True) - masked * float(float(torch.tensor(lo, dtype=dtype)) > 0.0)
                clip_low = torch.dot(low_rows, (adv < 0).to(dtype))
            if seq is None and hi < math.inf:
                high_rows = _n_cmp(x, hi, False, True) - masked * float(float(torch.tensor(hi, dtype=dtype)) < 0.0)
                clip_high = torch.dot(high_rows, (adv > 0).to(dtype))
        elif row_adv:
            if seq is None and lo > -math.inf:
                low_rows = _n_cmp(scratch, lo, True, True) if cpu else -_below(scratch, lo, scratch).sum(1)
                clip_low = torch.dot(low_rows, (adv < 0).to(dtype))
            if seq is None and hi < math.inf:
                high_rows = _n_cmp(hi_fill, hi, False, True) if cpu else _above(hi_fill, hi, scratch).sum(1)
                clip_high = torch.dot(high_rows, (adv > 0).to(dtype))
        if row_adv:
            sq = torch.mul(x_ok, x_ok, out=scratch).sum(1)
            x_moments = _group_moments(torch.stack([x_rows, sq, row_min, row_max]), a_cls, _X_CLASSES)
            offset = (a_cls * _X_SLOTS + base).to(dtype).unsqueeze(-1)
        else:
            cls = torch.where(ok, a_cls, _X_CLASSES - 1)
            partial = torch.stack([x_ok, x_ok * x_ok, scratch, hi_fill]).reshape(4, -1)
            x_moments = _group_moments(partial, cls.reshape(-1), _X_CLASSES)
            if seq is None and lo > -math.inf:
                clip_low = -(_below(scratch, lo, scratch) * (adv < 0)).sum()
            if seq is None and hi < math.inf:
                clip_high = (_above(hi_fill, hi, scratch) * (adv > 0)).sum()
            offset = (cls * _X_SLOTS + base).to(dtype)
        if seq is not None and row_adv:
            clip_low = (ok_rows * ((seq < lo) & (adv < 0))).sum()
            clip_high = (ok_rows * ((seq > hi) & (adv > 0))).sum()
        elif seq is not None:
            clip_low = ((clip_x < lo) & (adv < 0) & ok).sum()
            clip_high = ((clip_x > hi) & (adv > 0) & ok).sum()
        x_counts = _count(_x_slots(x_ok, offset, hi_fill), _X_CLASSES * _X_SLOTS).view(_X_CLASSES, _X_SLOTS)
        del hi_fill  # done with: its memory serves the buffers below
        if row_adv:  # the tokens left out sit in their row's x == 0 slot: take them back out
            out_rows = torch.zeros(_X_CLASSES, dtype=torch.float64, device=device)
            x_counts[:, _X_ZERO_SLOT] -= out_rows.index_add_(0, a_cls, (t - ok_rows).double())
        x_counts = x_counts[:_SIGNS].reshape(-1)

        # psi, zeta, multiplier: bins, sum (the dots above: the sources are 0 or finite where
        # ok_f is 0), sum of squares, min, max and the multiplier's vanishing count. Fast path
        # (CPU, so reading a value back is free): a copy with the value of one kept token (`ref`)
        # on the tokens left out serves min and max (one `aminmax`) and the bins, from whose
        # bin of `ref` the left-out tokens are then taken back out. From `_JOINT` tokens on, the
        # three bin indices are packed into one (exact integers in a float) and counted by one
        # `bincount` (their joint histogram, whose sums are the three histograms; below that its
        # fixed cost outweighs the two passes it saves).
        if clean:
            left = float(b * t) - float(n_ok)
            ref_row = int(torch.argmax((ok_rows > 0).to(torch.uint8)))
            ref = ref_row * t + int(torch.argmax(ok_f[ref_row]))
            joint = torch.empty_like(scratch) if b * t >= _JOINT else None
            ref_bins = []
        counts, moments = [], []
        vanish = zero
        dump = None if clean else pen.clamp(max=_DUMP)  # _DUMP on the tokens left out
        for i, v in enumerate(sources):
            key = _OTHER[i]
            size = HISTOGRAMS[key].bins + 2
            sq = torch.dot(torch.mul(v, v, out=scratch).reshape(-1), ok_f.reshape(-1))
            if clean:
                ref_v = v.reshape(-1)[ref]
                # exact: v where ok_f is 1, ref_v where 0; written over pen, unused on this path now
                filled = torch.lerp(ref_v, v, ok_f, out=pen)
                low, high = torch.aminmax(filled)
                if joint is None:
                    counts.append(_count(_value_slots(filled, i, scratch), size))
                elif i == 0:
                    _value_slots(filled, i, joint)
                else:
                    torch.add(_value_slots(filled, i, scratch), joint, alpha=size, out=joint)
                ref_bins.append(_value_bin(float(ref_v), i))
                if key == "multiplier":
                    vanish = _n_cmp(filled, VANISH, True) - left * float(float(ref_v) < VANISH)
            else:
                assert dump is not None  # made above for this (not clean) path
                counts.append(_count(_value_slots(v, i, scratch).add_(dump), 2 * _DUMP)[:size])
                low = torch.add(v, pen, out=scratch).amin()
                if key == "multiplier":
                    vanish = -_below(scratch, VANISH, scratch).sum()
                high = torch.sub(v, pen, out=scratch).amax()
            moments.append(torch.stack([dots[i], sq, low, high]))
        if clean:
            if joint is not None:
                sizes = [HISTOGRAMS[k].bins + 2 for k in _OTHER]
                both = torch.bincount(joint.reshape(-1).to(torch.int32), minlength=_JOINT).view(sizes)
                counts = [both.sum([d for d in range(len(sizes)) if d != i]).double() for i in range(len(sizes))]
            for c, r in zip(counts, ref_bins, strict=True):
                c[r] -= left
        other_counts = torch.cat(counts)
        other_moments = torch.stack(moments).double()

        def masked_sum(v: Tensor) -> Tensor:
            """Sum of v over valid tokens (a dot with the mask when every value is finite)."""
            return torch.dot(v.reshape(-1), flat_vf) if clean else torch.where(valid, v, 0.0).sum()

        ent_sum, ent_n = zero, zero
        n_valid = n_ok if clean else vf.sum()
        logp_sum, *cov_sums = _cov_sums(logp_c, adv, valid)
        if ent is not None:
            ent_sum, ent_n = masked_sum(ent), n_valid
        loss_sum, loss_n = zero, zero
        if "loss" in stats:
            loss_sum, loss_n = stats["loss"].detach().reshape(()).to(dtype), torch.ones_like(zero)
        # x is 0 on masked tokens, so these terms are finite there: a dot with the mask sums them.
        if clean:  # sum(expm1(x) - x) as sum(expm1(x)) - sum(x): the row sums are at hand
            k3 = torch.dot(torch.expm1(x, out=scratch).reshape(-1), flat_vf) - x_rows.sum()
        else:
            k3 = torch.dot(torch.expm1(x, out=scratch).sub_(x).reshape(-1), flat_vf)
        survival = torch.dot(torch.neg(values[1], out=scratch).exp_().reshape(-1), flat_vf)
        parts = [
            n_valid,
            n_ok,
            torch.full((), float(x.numel()), dtype=dtype, device=device),
            torch.full((), float(b), dtype=dtype, device=device),
            ent_sum,
            ent_n,
            k3,
            logp_sum,
            loss_sum,
            loss_n,
            torch.dot(zeta_pos.to(dtype).reshape(-1), flat_vf),
            torch.dot(zeta_neg.to(dtype).reshape(-1), flat_vf),
            survival,
            vanish,
            clip_low,
            clip_high,
            zero if clean else torch.isinf(x_ok).sum(),
            *cov_sums,
        ]
        sums = torch.stack([p.double() for p in parts])
        nan_rows = None if clean else (vf.sum(1) - ok_rows) > 0
        outliers = self._outliers(x, valid, adv_t, values[1], token_ids, torch.maximum(row_max, -row_min), nan_rows)
        self._samples += b
        self._updates.append(
            _Update(
                sums,
                x_counts,
                x_moments,
                other_counts,
                other_moments,
                outliers,
                x_ok.reshape(-1),
                sources[1].reshape(-1),
                ok.reshape(-1),
                None if rollout_logp is None else _mismatch_partials(old_logp, rollout_logp, valid, dtype),
            )
        )

    def _update_empty(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        loss_stats: Mapping[str, Tensor] | None,
        entropy: Tensor | None,
        token_ids: Tensor | None,
        rollout_logp: Tensor | None = None,
    ) -> None:
        """A zero-size micro-batch as one fully masked column per row (a placeholder row when B = 0, not counted)."""
        b = logp.shape[0]
        rows = max(b, 1)

        def pad(t: Tensor, fill: float | bool = 0) -> Tensor:
            return torch.full((rows, 1), fill, dtype=t.dtype, device=t.device)

        adv = advantages.new_zeros((rows,) if advantages.dim() == 1 else (rows, 1))
        self.update(
            pad(logp),
            pad(old_logp),
            adv,
            pad(mask, False),
            loss_stats=loss_stats,
            entropy=None if entropy is None else pad(entropy),
            token_ids=None if token_ids is None else pad(token_ids),
            rollout_logp=None if rollout_logp is None else pad(rollout_logp),
        )
        if b == 0:
            self._updates[-1].sums[_SUMS.index("n_seq")] -= 1
            self._samples -= 1

    def _values(
        self, x: Tensor, valid: Tensor, adv: Tensor, stats: Mapping[str, Tensor]
    ) -> tuple[Tensor | None, list[Tensor], Tensor, Tensor]:
        """(GSPO's sequence log-ratio or None, [psi, zeta, multiplier], zeta_pos, zeta_neg) of
        the log-ratio `x` (0 on masked tokens): from `stats` when the loss computed them.
        """
        dtype = x.dtype
        if self.loss.name == "mhpo" and {"psi", "zeta", "zeta_pos", "zeta_neg"} <= stats.keys():
            psi, zeta, zeta_pos, zeta_neg = stats["psi"], stats["zeta"], stats["zeta_pos"], stats["zeta_neg"]
        else:
            _, psi, zeta_pos, zeta_neg = mhpo_loss.hazard(x, self.hazard_hparams)
            zeta = zeta_pos + zeta_neg
        seq = None
        if self.loss.name == "gspo":
            seq = (stats["seq_log_ratio"] if "seq_log_ratio" in stats else sequence_log_ratio(x, valid)).to(dtype)
        clip_x = x if seq is None else seq.unsqueeze(-1).expand_as(x)
        mult = stats["multiplier"] if "multiplier" in stats else self.loss.multiplier(clip_x, adv, **self.hparams)
        return seq, [v.to(dtype) for v in (psi, zeta, mult)], zeta_pos.to(dtype), zeta_neg.to(dtype)

    def _outliers(
        self,
        x: Tensor,
        valid: Tensor,
        adv: Tensor,
        zeta: Tensor,
        token_ids: Tensor | None,
        row_abs: Tensor,
        nan_rows: Tensor | None,
    ) -> Tensor:
        """(k, 7) rows of the top-|x| valid tokens (NaN first); score -1 marks padding rows.

        The top k tokens lie in the k rows of largest max |x| (`row_abs`, NaN for rows holding
        a NaN log-ratio), so only those rows are searched.
        """
        b, t = x.shape
        k = min(self.top_k, b * t)
        if k == 0:
            return torch.empty((0, 7), dtype=torch.float64, device=x.device)
        if nan_rows is not None:
            row_abs = row_abs.masked_fill(nan_rows, math.nan)
        rows = torch.topk(row_abs, min(k, b)).indices
        score = torch.where(valid[rows], x[rows].abs(), -1.0).reshape(-1)
        top, pick = torch.topk(score, k)
        flat = rows[pick // t] * t + pick % t
        ids = token_ids.reshape(-1)[flat].double() if token_ids is not None else torch.full_like(top, -1.0).double()
        return torch.stack(
            [
                top.double(),
                x.reshape(-1)[flat].double(),
                (adv.reshape(-1)[flat // t] if adv.shape[1] == 1 else adv.reshape(-1)[flat]).double(),
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

        def total(ts: list[Tensor]) -> Tensor:
            return ts[0] if len(ts) == 1 else torch.stack(ts).sum(0)

        def joined(ts: list[Tensor]) -> Tensor:
            return ts[0] if len(ts) == 1 else torch.cat(ts)

        sums = total([u.sums for u in ups])
        x_counts = total([u.x_counts for u in ups])
        other_counts = total([u.other_counts for u in ups])
        x_m = torch.stack([u.x_moments for u in ups])
        o_m = torch.stack([u.other_moments for u in ups])
        x_moments = torch.stack([x_m[:, 0].sum(0), x_m[:, 1].sum(0), x_m[:, 2].amin(0), x_m[:, 3].amax(0)])
        o_moments = torch.stack(
            [o_m[:, :, 0].sum(0), o_m[:, :, 1].sum(0), o_m[:, :, 2].amin(0), o_m[:, :, 3].amax(0)], 1
        )
        outliers = joined([u.outliers for u in ups])
        x_all = joined([u.x for u in ups])
        zeta_all = joined([u.zeta for u in ups])
        ok_all = joined([u.ok for u in ups])
        qs = list(PERCENTILES.values())
        with_mm = [u.mismatch is not None for u in ups]
        if any(with_mm) and not all(with_mm):
            raise ValueError(
                f"rollout_logp was given for {sum(with_mm)} of the step's {len(ups)} micro-batches; "
                "give it to every update() of a step or to none"
            )
        mm = None
        if all(with_mm):
            mm_parts = [u.mismatch for u in ups if u.mismatch is not None]
            mm = (
                total([m[0] for m in mm_parts]),
                torch.stack([m[1] for m in mm_parts]).amax(0),
                total([m[2] for m in mm_parts]),
            )

        distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
        if distributed:
            ties = _tie_counts(x_all, ok_all)
            additive = [sums, x_counts, other_counts, x_moments[:2].reshape(-1), o_moments[:, :2].reshape(-1), ties]
            x_fine = self._fine_hist(x_all, ok_all, HISTOGRAMS["log_ratio"])
            z_fine = self._fine_hist(zeta_all, ok_all, HISTOGRAMS["zeta"])
            additive += [x_fine, z_fine]
            maxima = [-x_moments[2], x_moments[3], -o_moments[:, 2], o_moments[:, 3]]
            if mm is not None:
                additive += [mm[0], mm[2]]
                maxima.append(mm[1])
            flat_sum = torch.cat(additive)
            dist.all_reduce(flat_sum, op=dist.ReduceOp.SUM, group=process_group)
            extremes = torch.cat(maxima)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=process_group)
            parts = list(torch.split(flat_sum, [t.numel() for t in additive]))
            if mm is not None:
                mm = (parts[8], extremes[-len(_MM_MAX) :], parts[9])
            sums, x_counts, other_counts, ties = parts[0], parts[1], parts[2], parts[5]
            nx, no = x_moments.shape[1], o_moments.shape[0]
            x_moments = torch.stack([*parts[3].view(2, nx), -extremes[:nx], extremes[nx : 2 * nx]])
            o_moments = torch.stack(
                [*parts[4].view(no, 2).T, -extremes[2 * nx : 2 * nx + no], extremes[2 * nx + no : 2 * (nx + no)]], 1
            )
            x_min, x_max = x_moments[2, :3].amin(), x_moments[3, :3].amax()
            x_q = _quantiles_from_hist(parts[6], HISTOGRAMS["log_ratio"], x_min, x_max, qs)
            z_q = _quantiles_from_hist(parts[7], HISTOGRAMS["zeta"], o_moments[1, 2], o_moments[1, 3], [0.99])
            outliers = self._gather_outliers(outliers, process_group)
        elif x_all.is_cuda:
            ties = _tie_counts(x_all, ok_all)
            x_q = _quantiles_by_sort(x_all, ok_all, qs)
            z_q = _quantiles_by_sort(zeta_all, ok_all, [0.99])
        else:  # CPU: copy the kept values out once (fast: masks come in runs), then select
            keep = ok_all.numpy()
            x_kept = x_all.numpy()[keep]
            cells = x_counts.view(_SIGNS, _X_SLOTS).sum(0)  # a tie's cell empty: no value to count
            tie_n = [_ties_np(x_kept, t) if cells[_TIE_CELLS[t]] else 0.0 for t in _TIES]
            ties = torch.tensor(tie_n, dtype=torch.float64)
            x_q = _selected_quantiles(x_kept, qs)
            z_q = _selected_quantiles(zeta_all.numpy()[keep], [0.99])
        k = min(self.top_k, outliers.shape[0])
        outliers = outliers[torch.topk(outliers[:, 0], k).indices] if k else outliers[:0]

        packed = [sums, x_counts, other_counts, x_moments.reshape(-1), o_moments.reshape(-1), x_q, z_q, ties]
        if mm is not None:
            packed += list(mm)
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
        sums_a, x_counts, other_counts, x_mom, o_mom, x_q, z_q, ties_a = parts[:8]
        mm = parts[8:]
        outlier_rows = host[at:].reshape(-1, 7)
        s = dict(zip(_SUMS, sums_a.tolist(), strict=True))
        n = s["n_valid"]
        spec = _X_SPEC
        xc = x_counts.reshape(_SIGNS, _X_SLOTS)
        x_mom = x_mom.reshape(4, _X_CLASSES)
        merged = xc.sum(0)
        before = np.concatenate([[0.0], np.cumsum(merged)])  # before[i]: values in the cells left of cell i
        ties = dict(zip(_TIES, ties_a.tolist(), strict=True))
        n_ok = float(before[-1])
        has_nan = n > n_ok

        def ratio(num: float, den: float) -> float:
            return num / den if den > 0 else math.nan

        def mean_std(total: float, sq: float, cnt: float) -> tuple[float, float]:
            if has_nan or cnt == 0:
                return math.nan, math.nan
            mean = float(total) / float(cnt)
            var = float(sq) / float(cnt) - mean * mean
            return mean, math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan

        if n == 0:  # an empty step: token counts, and none of the statistics that need a token
            scalars: dict[str, float] = {"tokens/valid": 0.0}
            if s["loss_n"] > 0:
                scalars["train/loss"] = s["loss_sum"] / s["loss_n"]
            return StepStats(scalars=scalars, histograms={}, outliers=[])
        scalars = {"tokens/valid": float(n)}
        sx, sqx = float(x_mom[0, :3].sum()), float(x_mom[1, :3].sum())
        x_mean, x_std = mean_std(sx, sqx, n_ok)
        scalars["ratio/mean"], scalars["ratio/std"] = x_mean, x_std
        scalars["ratio/min"] = float(x_mom[2, :3].min()) if n_ok else math.nan
        scalars["ratio/max"] = float(x_mom[3, :3].max()) if n_ok else math.nan
        for (name, _), value in zip(PERCENTILES.items(), x_q.tolist(), strict=True):
            scalars[f"ratio/{name}"] = value

        # Thresholds are bin edges, and bins are closed on the left: x < edge counts the cells
        # before the edge's bin, x > edge the others less the values equal to the edge.
        def n_below(v: float) -> float:
            return float(before[round((v - spec.lo) * spec.bins / (spec.hi - spec.lo)) + 1])

        def n_above(v: float) -> float:
            return n_ok - n_below(v) - ties[v]

        scalars["ratio/pos_mass"] = ratio(n_above(0.0), n)
        scalars["ratio/neg_mass"] = ratio(n_below(0.0), n)
        for t in THRESHOLDS:
            scalars[f"ratio/frac_above_{t:g}"] = ratio(n_above(t), n)
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

        def nan_or(v: float) -> float:
            return math.nan if has_nan else v

        scalars["hazard/zeta_mean"] = z_mean
        scalars["hazard/zeta_p99"] = float(z_q[0])
        scalars["hazard/zeta_pos_mean"] = nan_or(ratio(s["zeta_pos_sum"], n))
        scalars["hazard/zeta_neg_mean"] = nan_or(ratio(s["zeta_neg_sum"], n))
        scalars["hazard/survival_mean"] = nan_or(ratio(s["survival_sum"], n))
        m_mean, _ = mean_std(o_mom[2, 0], o_mom[2, 1], n_ok)
        scalars["grad/multiplier_mean"] = m_mean
        scalars["grad/multiplier_min"] = float(o_mom[2, 2]) if n_ok else math.nan
        scalars["grad/multiplier_max"] = float(o_mom[2, 3]) if n_ok else math.nan
        scalars["grad/vanish_frac"] = ratio(s["vanish_n"], n)
        if s["entropy_n"] > 0:
            scalars["policy/entropy"] = s["entropy_sum"] / s["entropy_n"]
        scalars["policy/kl_k1"] = -x_mean
        scalars["policy/kl_k3"] = ratio(s["k3_sum"], n)
        scalars["policy/logp_mean"] = ratio(s["logp_sum"], n)
        scalars["policy/cov_logp_adv"], scalars["policy/corr_logp_adv"] = _cov_corr(s, n)
        scalars["policy/length_mean"] = ratio(n, s["n_seq"])
        if s["loss_n"] > 0:
            scalars["train/loss"] = s["loss_sum"] / s["loss_n"]

        histograms: dict[str, dict[str, Any]] = {}
        for key, counts, mom in (
            ("log_ratio", merged, (sx, sqx, x_mom[2, :3].min(), x_mom[3, :3].max())),
            ("log_ratio/adv_pos", xc[0], tuple(x_mom[:, 0])),
            ("log_ratio/adv_neg", xc[1], tuple(x_mom[:, 1])),
            *((k, other[k], tuple(o_mom[i])) for i, k in enumerate(_OTHER)),
        ):
            hist = _c1_histogram(HISTOGRAMS[key], counts, mom)
            if hist is not None:
                histograms[key] = hist
        if mm:
            mm_scalars, mm_hist = _mismatch_stats(*mm)
            scalars |= mm_scalars
            if mm_hist is not None:
                histograms["mismatch"] = mm_hist

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


def _cov_sums(logp: Tensor, adv: Tensor, valid: Tensor) -> list[Tensor]:
    """float64 sums over the valid tokens of logp, A, A^2, A * logp and logp^2: the moments of
    `policy/cov_logp_adv` and `policy/corr_logp_adv`. `adv` is (B,) or (B, T). A product of two
    float32 values is exact in float64, so only the summation rounds (pairwise, ~1e-16 relative)."""
    lp = torch.where(valid, logp, 0.0).double()
    l_rows = lp.sum(1)
    if adv.dim() == 1:  # per-sequence advantages: a row's A times its token count and its logp sum
        n_rows = valid.sum(1).double()
        a = torch.where(n_rows > 0, adv.double(), 0.0)
        a_n = a * n_rows
        a_sums = [a_n.sum(), (a * a_n).sum(), (a * l_rows).sum()]
    else:
        a_t = torch.where(valid, adv, 0.0).double()
        a_sums = [a_t.sum(), (a_t * a_t).sum(), (a_t * lp).sum()]
    return [l_rows.sum(), *a_sums, (lp * lp).sum()]


def _cov_corr(s: Mapping[str, float], n: float) -> tuple[float, float]:
    """(cov, Pearson corr) of A and logp over the `n` valid tokens from `_cov_sums`' merged sums.

    A variance under `COV_ZERO_VAR` of its mean square (a std under 1e-6 of the root mean
    square: float64 rounding of the sums, not spread) counts as 0, and then both are 0.0: a
    constant advantage (every group degenerate) or log-prob gives no correlation, not NaN.
    A NaN or infinite logp or A on a valid token makes both NaN.
    """
    mean_a, mean_l = s["adv_sum"] / n, s["logp_sum"] / n
    sq_a, sq_l = s["adv_sq_sum"] / n, s["logp_sq_sum"] / n
    var_a, var_l = sq_a - mean_a * mean_a, sq_l - mean_l * mean_l
    cov = s["adv_logp_sum"] / n - mean_a * mean_l
    if not all(math.isfinite(v) for v in (cov, var_a, var_l)):
        return math.nan, math.nan
    if var_a <= COV_ZERO_VAR * sq_a or var_l <= COV_ZERO_VAR * sq_l:
        return 0.0, 0.0
    return cov, min(max(cov / math.sqrt(var_a * var_l), -1.0), 1.0)


def _mismatch_partials(
    old_logp: Tensor, rollout_logp: Tensor, valid: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 sums (`_MM_SUMS`), maxima (`_MM_MAX`) and `mismatch` bins of d = old_logp - rollout_logp.

    A valid token whose d is NaN (the engine gave no log-prob for it, as vLLM can) is left out
    and counted in `mismatch/unscored_frac`; masked tokens count nowhere, whatever they hold.
    """
    old = old_logp.detach().to(dtype)
    d_raw = (old - rollout_logp.detach().to(dtype)).double()  # d as the loss sees it; moments in float64
    old = old.double()
    scored = valid & ~torch.isnan(d_raw)
    d = torch.where(scored, d_raw, 0.0)  # 0 (so w = 1) on the tokens left out
    sf = _as_float(scored, torch.float64)
    u = torch.expm1(d.clamp(-_MM_BOUND, _MM_BOUND))  # w - 1: 0 on the tokens left out
    absd = d.abs()
    prob_abs = torch.where(scored, (torch.exp(old) - torch.exp(old - d)).abs(), 0.0)
    bucket = torch.zeros(old.shape, dtype=torch.int8, device=old.device)  # by the trainer's probability
    for edge in _LOG_EDGES:
        bucket += (old >= edge).to(torch.int8)
    sums = [valid.sum().double(), sf.sum(), absd.sum(), d.sum(), (d * d).sum(), (u - d).sum()]
    sums += [u.sum(), (u * u).sum(), prob_abs.sum()]
    for i in range(len(MISMATCH_BUCKETS)):
        in_bucket = _as_float(bucket == i, torch.float64) * sf
        sums += [(absd * in_bucket).sum(), in_bucket.sum()]
    rows = scored.any(1)
    maxima = [
        torch.where(scored, d, -math.inf).amax(),
        torch.where(scored, -d, -math.inf).amax(),
        torch.where(scored, u, -math.inf).amax(),
        torch.where(scored, -u, -math.inf).amax(),
        torch.where(rows, d.sum(1), -math.inf).amax(),
        torch.where(scored, prob_abs, -math.inf).amax(),
    ]
    p, q, shift = _MM_SCALE
    width = (_MM_SPEC.hi - _MM_SPEC.lo) / _MM_SPEC.bins
    slots = torch.clamp(d, _MM_SPEC.lo - width / 2, _MM_SPEC.hi).to(torch.float64).mul_(p).div_(q).floor_()
    slots = torch.where(scored, slots.add_(shift + 1), float(_MM_SLOTS))  # the tokens left out: a dump slot
    counts = _count(slots, _MM_SLOTS + 1)[:_MM_SLOTS]
    to64 = [t.to(torch.float64) for t in (*sums, *maxima)]
    return torch.stack(to64[: len(sums)]), torch.stack(to64[len(sums) :]), counts


def _mismatch_stats(
    sums: np.ndarray, maxima: np.ndarray, counts: np.ndarray
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """The `mismatch/*` scalars and the `mismatch` histogram from the merged partials (host side)."""
    s = dict(zip(_MM_SUMS, sums.tolist(), strict=True))
    m = dict(zip(_MM_MAX, maxima.tolist(), strict=True))
    n = s["n"]
    out = {"mismatch/unscored_frac": (s["valid"] - n) / s["valid"]} if s["valid"] > 0 else {}
    if n == 0:
        return out, None
    u_mean, u2_mean = s["u"] / n, s["u2"] / n  # moments of w - 1
    w2_sum = n + 2.0 * s["u"] + s["u2"]
    out |= {
        "mismatch/abs_mean": s["abs"] / n,
        "mismatch/abs_max": max(m["d_max"], m["neg_d_min"]),
        "mismatch/kl_k1": -s["d"] / n,
        "mismatch/kl_k3": s["k3"] / n,
        "mismatch/is_mean": 1.0 + u_mean,
        "mismatch/is_min": 1.0 - m["neg_u_min"],
        "mismatch/is_max": 1.0 + m["u_max"],
        "mismatch/is_std": math.sqrt(max(u2_mean - u_mean * u_mean, 0.0)),
        "mismatch/ess": (n + s["u"]) ** 2 / (n * w2_sum),
        "mismatch/chi2": u2_mean + 2.0 * u_mean,
        "mismatch/seq_log_max": m["seq_max"],
        "mismatch/prob_abs_mean": s["prob_abs"] / n,
        "mismatch/prob_abs_max": m["prob_abs_max"],
    }
    for i, (suffix, _, _) in enumerate(MISMATCH_BUCKETS):
        if s[f"n_{i}"] > 0:  # an empty bucket has no mean (and NaN would read as a fault)
            out[f"mismatch/abs_mean_{suffix}"] = s[f"abs_{i}"] / s[f"n_{i}"]
    hist = _c1_histogram(_MM_SPEC, counts, (s["d"], s["d2"], -m["neg_d_min"], m["d_max"]))
    return out, hist


def _c1_histogram(spec: HistSpec, counts: np.ndarray, mom: tuple[float, ...]) -> dict[str, Any] | None:
    """C1 histogram dict from (bins + 2) counts (underflow, bins..., overflow) and (sum, sumsq, min, max)."""
    total = float(counts.sum())
    if total == 0:
        return None
    ints = np.rint(counts).astype(np.int64).tolist()
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


def _tie_counts(x: Tensor, ok: Tensor) -> Tensor:
    """float64 counts of the kept x equal to each of `_TIES` (0 where x's dtype cannot hold t)."""
    exact = [x.dtype == torch.float64 or float(np.float32(t)) == t for t in _TIES]  # x: float32 or float64
    zero = torch.zeros((), dtype=torch.int64, device=x.device)
    return torch.stack([((x == t) & ok).sum() if e else zero for t, e in zip(_TIES, exact, strict=True)]).double()


def _ties_np(kept: np.ndarray, t: float) -> float:
    """`_tie_counts` on the CPU's copy of the kept values."""
    return float(np.count_nonzero(kept == t)) if float(kept.dtype.type(t)) == t else 0.0


def _selected_quantiles(vals: np.ndarray, qs: list[float]) -> Tensor:
    """Linear-interpolated quantiles (as torch.quantile) of `vals`, reordering it; NaN when empty."""
    n = vals.size
    if n == 0:
        return torch.full((len(qs),), math.nan, dtype=torch.float64)
    positions = [q * (n - 1) for q in qs]
    kth = sorted({math.floor(p) for p in positions})
    _partition(vals, kth)
    # Each kth element is in place and the ones after it are larger, so the next order
    # statistic is the least of the stretch up to the next kth.
    bounds = dict(zip(kth, [*kth[1:], n - 1], strict=True))
    out = []
    for p in positions:
        k = math.floor(p)
        lo = float(vals[k])
        hi = float(vals[k + 1 : bounds[k] + 1].min()) if p > k else lo
        out.append(lo if lo == hi else lo + (hi - lo) * (p - k))
    return torch.tensor(out, dtype=torch.float64)


def _partition(a: np.ndarray, kth: list[int]) -> None:
    """`a.partition(kth)` for sorted `kth`, as one single-kth partition per kth on ever shorter
    stretches: numpy selects a single kth with vectorised code, many times faster than its
    multi-kth introselect.
    """
    todo = [(0, a.size, kth)]
    while todo:
        lo, hi, ks = todo.pop()
        if not ks:
            continue
        mid = len(ks) // 2
        k = ks[mid]
        a[lo:hi].partition(k - lo)
        todo += [(lo, k, ks[:mid]), (k + 1, hi, ks[mid + 1 :])]


def _sorted_quantiles(v: Tensor, n_ok: Tensor, qs: list[float]) -> Tensor:
    """Sync-free quantiles of the `n_ok` largest entries of the flat `v`, whose others are -inf:
    sort, gather at device-computed positions.
    """
    ordered = torch.sort(v.reshape(-1).double()).values
    n = n_ok.double()
    last = max(ordered.numel() - 1, 0)
    pad = ordered.numel() - n
    q = torch.tensor(qs, dtype=torch.float64, device=v.device)
    pos = q * (n - 1).clamp(min=0)
    lo_r, hi_r = pos.floor(), pos.ceil()
    lo = ordered[(lo_r + pad).long().clamp(0, last)]
    hi = ordered[(hi_r + pad).long().clamp(0, last)]
    out = torch.where(lo == hi, lo, lo + (hi - lo) * (pos - lo_r))
    return torch.where(n > 0, out, math.nan)


def _exact_quantiles(v: Tensor, ok: Tensor, qs: list[float]) -> Tensor:
    """Linear-interpolated quantiles of v[ok] (as torch.quantile), NaN when empty.

    CUDA: a sort (no sync). CPU: the kept values are copied out (fast: masks come in runs) and
    selected by single-kth partitions.
    """
    if v.is_cuda:
        return _quantiles_by_sort(v, ok, qs)
    return _selected_quantiles(v.reshape(-1).numpy()[ok.reshape(-1).numpy()], qs)


def _quantiles_by_sort(v: Tensor, ok: Tensor, qs: list[float]) -> Tensor:
    """`_exact_quantiles` by the sort path on any device."""
    return _sorted_quantiles(torch.where(ok, v, -math.inf).reshape(-1), ok.sum(), qs)


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


def grad_norm_after_clip(norm: float, max_norm: float | None) -> float:
    """The global grad-norm that clipping at `max_norm` leaves, from the norm before it.

    As torch's `clip_grad_norm_` (which TRL, verl and the trainer use): the gradients are scaled by
    min(1, max_norm / (norm + 1e-6)), so this is min(norm, max_norm) to within 1e-6. `max_norm`
    None or <= 0 means no clipping (transformers' convention): the norm itself. A NaN or infinite
    norm gives NaN, which is what the scaled gradients hold then.
    """
    if not math.isfinite(norm):
        return math.nan
    if max_norm is None or max_norm <= 0:
        return norm
    return norm * min(1.0, max_norm / (norm + 1e-6))


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
    rollout_logp: Tensor | None = None,
) -> StepStats:
    """One-shot `DiagnosticsAccumulator` for a step held in one batch (TRL callbacks, custom loops)."""
    acc = DiagnosticsAccumulator(loss_name, hparams, top_k=top_k)
    acc.update(
        logp,
        old_logp,
        advantages,
        mask,
        loss_stats=loss_stats,
        entropy=entropy,
        token_ids=token_ids,
        rollout_logp=rollout_logp,
    )
    return acc.compute(process_group=process_group)
