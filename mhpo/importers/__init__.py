"""Importers: runs logged with TensorBoard, MLflow or as CSV, brought in through the service's ingest API.

`mhpo import tensorboard|mlflow|csv ...` (see `cli`). Readers turn a source into `SourceRun`s,
checked whole before anything is sent; `Writer` sends them through `POST /api/v1/runs/{id}/records`,
so flags and alert rules run on the imported history as on a streamed one.
"""

from mhpo.importers._csv import read_csv
from mhpo.importers._mlflow import read_tracking
from mhpo.importers._model import SourceError, SourceRun
from mhpo.importers._tensorboard import read_logdir
from mhpo.importers._writer import ImportFailed, RunResult, Writer

__all__ = [
    "ImportFailed",
    "RunResult",
    "SourceError",
    "SourceRun",
    "Writer",
    "read_csv",
    "read_logdir",
    "read_tracking",
]
