"""TensorBoard logdirs -> runs: every directory holding event files is one run.

Records are read with TensorBoard's own record reader (`PyRecordReader_New`, which checks each
record's CRC) and its protobufs; summaries are decoded as TensorBoard does: scalars written as
`simple_value` (torch's `SummaryWriter`, TRL / transformers, verl) or as scalar tensors (TF2),
histograms as `histo` protos or `(k, 3)` tensors. Images, text and other plugins are skipped
and counted. The event files of a run are read in name order (their names start with the
creation time), so a step logged again by a resumed run keeps its latest value.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from mhpo.importers._model import (
    MAX_STEP,
    Bucket,
    SourceError,
    SourceRun,
    build_records,
    check_key,
    check_step,
    histogram_series,
    wall_time,
)

EVENT_GLOB = "*tfevents*"
PARALLEL_BYTES = 16 * 1024 * 1024  # below this, starting reader processes costs more than it saves


def find_runs(logdir: Path) -> list[Path]:
    """The directories under `logdir` (itself included) that hold event files, sorted."""
    if not logdir.exists():
        raise SourceError(f"{logdir}: no such directory; pass the directory TensorBoard was started with (--logdir)")
    if logdir.is_file():
        raise SourceError(f"{logdir}: is a file; pass the directory that holds the event files")
    return sorted({p.parent for p in logdir.rglob(EVENT_GLOB) if p.is_file()})


def read_logdir(logdir: Path, project: str | None = None, name: str | None = None) -> list[SourceRun]:
    """One SourceRun per run directory under `logdir`: project = `project` or the logdir's name,
    run name = `name` (one run only) or the run directory's path under the logdir."""
    logdir = logdir.resolve()
    dirs = find_runs(logdir)
    if not dirs:
        raise SourceError(f"{logdir}: holds no TensorBoard event files ({EVENT_GLOB}); pass the logdir of a run")
    if name is not None and len(dirs) > 1:
        listed = ", ".join(str(d.relative_to(logdir)) for d in dirs[:5])
        raise SourceError(
            f"{logdir}: --name {name!r} names one run, but the logdir holds {len(dirs)} ({listed}...): "
            "drop --name (each run keeps its directory's name) or pass one run's directory"
        )
    jobs = []
    for run_dir in dirs:
        rel = run_dir.relative_to(logdir).as_posix()
        jobs.append((run_dir, project or logdir.name, name or (logdir.name if rel == "." else rel)))
    workers = min(len(jobs), os.cpu_count() or 1)
    size = sum(p.stat().st_size for run_dir in dirs for p in run_dir.glob(EVENT_GLOB) if p.is_file())
    if workers < 2 or size < PARALLEL_BYTES:
        return [read_run(*job) for job in jobs]
    # Reading is CPU-bound (TensorBoard's reader checks each record's CRC in Python): one process per run
    # directory. Spawned, not forked: the importer may already hold threads (a progress bar, a server).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(read_run, *zip(*jobs, strict=True)))


def read_run(run_dir: Path, project: str, name: str) -> SourceRun:
    scalars: dict[int, dict[str, float]] = defaultdict(dict)
    times: dict[int, float] = {}
    hists: dict[str, dict[int, tuple[list[Bucket], dict[str, float]]]] = defaultdict(dict)
    plugins: dict[str, str] = {}
    skipped: dict[str, int] = defaultdict(int)
    keys: set[str] = set()
    points = 0
    for path in sorted(run_dir.glob(EVENT_GLOB)):
        if not path.is_file():
            continue
        for index, event in _events(path):
            if not event.HasField("summary"):
                continue
            step = event.step
            if not 0 <= step <= MAX_STEP:
                check_step(step, f"{path}: record {index}")
            seconds = wall_time(event.wall_time)
            if seconds is not None and seconds > times.get(step, 0.0):
                times[step] = seconds
            for value in event.summary.value:
                tag = value.tag
                if tag not in keys:
                    check_key(tag, f"{path}: record {index}")
                    keys.add(tag)
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    scalars[step][tag] = value.simple_value
                elif kind == "histo":
                    hists[tag][step] = _legacy_histogram(value.histo)
                else:
                    if value.HasField("metadata") and value.metadata.plugin_data.plugin_name:
                        plugins[tag] = value.metadata.plugin_data.plugin_name  # TF2 writes it with a tag's first value
                    if kind != "tensor" or plugins.get(tag) not in ("scalars", "histograms"):
                        skipped[plugins.get(tag) or kind or "empty"] += 1
                        continue
                    scalar = _tensor(value, plugins[tag], hists, step, f"{path}: record {index}")
                    if scalar is not None:
                        scalars[step][tag] = scalar
                points += 1
    histograms: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    notes = [f"skipped {n} {plugin} summaries (not scalars or histograms)" for plugin, n in sorted(skipped.items())]
    for tag, series in sorted(hists.items()):
        converted, exact = histogram_series(series)
        for step, hist in converted.items():
            histograms[step][tag] = hist
        if not exact:
            notes.append(f"histogram {tag!r}: buckets differ between steps, kept as a generic 64-bin histogram")
    return SourceRun(
        project=project,
        name=name,
        source=f"tensorboard:{run_dir}",
        format="tensorboard",
        config={"logdir": str(run_dir)},
        records=build_records(scalars, times, histograms),
        points=points,
        notes=notes,
    )


def _use_native_crc32c(pywrap_tensorflow: Any) -> None:
    """Give TensorBoard's record reader Google's native CRC-32C.

    Without TensorFlow, TensorBoard's reader checks each record's two checksums with a pure-Python
    CRC-32C (`pywrap_tensorflow.crc32c`), which is most of the reading time (about 20 us a record).
    `google_crc32c.value` computes the same checksum in C; the reader, its framing and its
    corruption checks stay TensorBoard's own.
    """
    import google_crc32c

    pywrap_tensorflow.crc32c = google_crc32c.value


def _events(path: Path) -> Any:
    """(record index, Event) of every record of an event file; a bad record is a SourceError naming it."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

    _use_native_crc32c(pywrap_tensorflow)
    reader = pywrap_tensorflow.PyRecordReader_New(str(path).encode())
    index = 0
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return
        except errors.DataLossError as exc:
            raise SourceError(
                f"{path}: record {index} is damaged ({exc.message}): the file is truncated or corrupt, e.g. the "
                "writer was killed mid-write. Move the file out of the run directory (its other files still import) "
                "or restore it, then run the import again"
            ) from None
        try:
            event = event_pb2.Event.FromString(reader.record())
        except DecodeError as exc:
            raise SourceError(
                f"{path}: record {index} is not a TensorBoard event ({exc}): the file is not an event file or is "
                "corrupt; move it out of the run directory and run the import again"
            ) from None
        yield index, event
        index += 1


def _legacy_histogram(histo: Any) -> tuple[list[Bucket], dict[str, float]]:
    """A `HistogramProto` as buckets (as TensorBoard's data_compat reads it: edges bounded by min and max)."""
    limits = list(histo.bucket_limit)
    counts = list(histo.bucket)
    if not counts:
        return [], {}
    lefts = [histo.min, *limits[:-1]]
    rights = [*limits[:-1], histo.max]
    buckets = [(float(a), float(b), float(c)) for a, b, c in zip(lefts, rights, counts, strict=True)]
    stats = {"min": histo.min, "max": histo.max, "sum": histo.sum, "sumsq": histo.sum_squares}
    return buckets, {k: float(v) for k, v in stats.items()}


def _tensor(
    value: Any,
    plugin: str,
    hists: dict[str, dict[int, tuple[list[Bucket], dict[str, float]]]],
    step: int,
    where: str,
) -> float | None:
    """A TF2 tensor summary: a scalar's value, or its histogram put into `hists` (None)."""
    from tensorboard.util import tensor_util

    array = tensor_util.make_ndarray(value.tensor)
    if plugin == "scalars":
        if array.size != 1:
            raise SourceError(f"{where}: scalar {value.tag!r} holds {array.size} values; a scalar holds one")
        return float(array.reshape(-1)[0])
    if array.ndim != 2 or array.shape[1] != 3:
        raise SourceError(f"{where}: histogram {value.tag!r} has shape {array.shape}, not (buckets, 3)")
    hists[value.tag][step] = ([(float(a), float(b), float(c)) for a, b, c in array.tolist() if math.isfinite(c)], {})
    return None
