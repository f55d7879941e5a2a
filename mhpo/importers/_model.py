"""What every reader hands the writer: a run's whole history, checked before anything is sent.

A reader turns one source (a TensorBoard run directory, an MLflow run, a CSV file or one of its
run-column groups) into a `SourceRun`: project, name, a stable `source` tag (what makes a re-run
find the same run), the run's config, and its records in the C1 shape, sorted by step. Readers
raise `SourceError` for input they cannot import, so a bad file stops the import before any of
its points reach the server.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mhpo.integrations.names import product_scalars

MAX_STEP = 2**53
# C1's key rule (docs/contracts.md): 1-250 characters, no control characters, valid Unicode.
KEY_RE = re.compile(r"^[^\x00-\x1f\x7f\ud800-\udfff]{1,250}$")
NAME_RE = re.compile(r"^[^\x00-\x1f\x7f\ud800-\udfff]{1,200}$")  # a project or run name (C7)
GENERIC_BINS = 64


class SourceError(ValueError):
    """A source that cannot be imported; the message names the file, the line or record, and the fix."""


@dataclass
class SourceRun:
    """One run's history as read from its source, in the product's record shape (C1)."""

    project: str
    name: str
    source: str
    format: str
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"
    points: int = 0
    notes: list[str] = field(default_factory=list)


def check_key(key: str, where: str) -> None:
    """Refuse, before sending, a key the server would refuse item by item (so nothing is half-imported)."""
    if not KEY_RE.match(key):
        raise SourceError(
            f"{where}: metric name {key[:60]!a} cannot be a key (1-250 printable characters, valid Unicode): "
            "rename it in the source"
        )


def check_names(run: SourceRun) -> None:
    """Refuse, before sending anything, a project or run name the server would refuse."""
    for option, value in (("--project", run.project), ("--name", run.name)):
        if not NAME_RE.match(value):
            raise SourceError(
                f"{run.source}: {option[2:]} {value[:60]!a} cannot name a {option[2:]} (1-200 printable characters): "
                f"pass {option}"
            )


def check_step(step: int, where: str) -> None:
    if not 0 <= step <= MAX_STEP:
        raise SourceError(f"{where}: step {step} is outside 0..2**53: only non-negative steps can be imported")


def build_records(
    scalars: Mapping[int, Mapping[str, float]],
    times: Mapping[int, float],
    histograms: Mapping[int, Mapping[str, dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """C1 records sorted by step; TRL / verl names get the product's key too (originals kept)."""
    histograms = histograms or {}
    out = []
    for step in sorted(set(scalars) | set(histograms)):
        record: dict[str, Any] = {"step": step, "scalars": product_scalars(scalars.get(step, {}))}
        if step in times:
            record["time"] = times[step]
        if histograms.get(step):
            record["histograms"] = dict(histograms[step])
        out.append(record)
    return out


def wall_time(seconds: float) -> float | None:
    """A source's timestamp as C1's `time` (unix seconds), or None when it is not one."""
    return seconds if math.isfinite(seconds) and 0 < seconds <= 1e11 else None


Bucket = tuple[float, float, float]  # (left edge, right edge, count)


def histogram_series(
    steps: Mapping[int, tuple[list[Bucket], dict[str, float]]],
) -> tuple[dict[int, dict[str, Any]], bool]:
    """One tag's histograms as C1 histograms with one binning for every step, and whether it is exact.

    Exact when every step has the same contiguous, equal-width buckets: they become the record's
    bins as they are. Otherwise (TensorFlow's exponential buckets, or edges that follow each step's
    data, as `torch.utils.tensorboard`'s default does) the tag is kept as a generic histogram on
    `GENERIC_BINS` uniform bins over the range of all its steps, each source bucket's count in the
    bin holding the bucket's centre (totals, min and max are kept; positions move by less than a bin).
    `stats` may hold the exact min, max, sum and sum of squares; missing ones come from the buckets.
    """
    edges = {(*(b[0] for b in buckets), buckets[-1][1]) for buckets, _ in steps.values() if buckets}
    exact = len(edges) == 1 and _uniform(next(iter(edges)))
    lefts = [buckets[0][0] for buckets, _ in steps.values() if buckets]
    rights = [buckets[-1][1] for buckets, _ in steps.values() if buckets]
    lo, hi = (min(lefts), max(rights)) if lefts else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    bins = len(next(iter(edges))) - 1 if exact else GENERIC_BINS
    width = (hi - lo) / bins
    out: dict[int, dict[str, Any]] = {}
    for step, (buckets, stats) in steps.items():
        counts = [0] * bins
        total = sum_ = sumsq = 0.0
        for left, right, count in buckets:
            centre = (left + right) / 2
            slot = min(bins - 1, max(0, int((centre - lo) / width))) if not exact else None
            counts[slot if slot is not None else _index(left, lo, width, bins)] += round(count)
            total += count
            sum_ += centre * count
            sumsq += centre * centre * count
        out[step] = {
            "lo": lo,
            "hi": hi,
            "counts": counts,
            "min": stats.get("min", buckets[0][0] if buckets else math.nan),
            "max": stats.get("max", buckets[-1][1] if buckets else math.nan),
            "sum": stats.get("sum", sum_),
            "sumsq": stats.get("sumsq", sumsq),
        }
    return out, exact


def _uniform(edges: Iterable[float]) -> bool:
    values = list(edges)
    widths = [b - a for a, b in itertools.pairwise(values)]
    return bool(widths) and min(widths) > 0 and max(widths) - min(widths) <= 1e-6 * max(widths)


def _index(left: float, lo: float, width: float, bins: int) -> int:
    return min(bins - 1, max(0, round((left - lo) / width)))
