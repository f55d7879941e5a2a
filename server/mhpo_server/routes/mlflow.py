"""The part of MLflow's tracking REST API (`/api/2.0/mlflow/...`) the `mlflow` client uses to log a run.

With `MLFLOW_TRACKING_URI` pointed at `mhpo serve`, any MLflow logger (transformers'
`MLflowCallback`, so TRL's `report_to="mlflow"`; verl's `trainer.logger=['mlflow']`; Lightning)
streams into MHPO Monitor with flags and alerts. Experiment = project (its id is the project
name; MLflow's default experiment "0" is the project "Default"), MLflow run = run, params and
tags = the run's config (tags under "mlflow.tags"). Metrics are stored under their own names
and, for TRL / verl / transformers names, under the product's keys too
(`mhpo.integrations.names`). MLflow's `step` is the step; timestamps are milliseconds.
Errors answer in MLflow's shape, `{"error_code": ..., "message": ...}`; auth is the product's
(`MLFLOW_TRACKING_TOKEN` is sent as a Bearer token).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    model_validator,
)
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mhpo.integrations.names import product_scalars
from mhpo_server.deps import Principal, ReadAccess, StoreDep, WriteAccess
from mhpo_server.routes.records import RUN_LOCKS
from mhpo_server.schemas import MAX_STEP, Key, Name, RecordIn, RunCreate, Text, clean_config, unstorable
from mhpo_server.schemas import Run as RunOut
from mhpo_server.store import Conflict, Invalid, NotFound, Store

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = ("0", "Default")
STATUS = {"RUNNING": "running", "SCHEDULED": "running", "FINISHED": "finished", "FAILED": "failed", "KILLED": "failed"}
MLFLOW_STATUS = {"running": "RUNNING", "finished": "FINISHED", "failed": "FAILED", "crashed": "FAILED"}
TAGS = "mlflow.tags"


class MLflowError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error(status: int, code: str, message: str) -> JSONResponse:
    # A lone surrogate echoed from the request has no UTF-8 encoding: escape it rather than fail.
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error_code": code, "message": text}, status_code=status)


def invalid(errors: list[Any]) -> str:
    """Each bad field by its path and why (never the value: it may be text that cannot be encoded)."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query")]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', '')}")
    return "; ".join(parts)


class MLflowRoute(APIRoute):
    """Answers every failure of these routes (auth, validation, store) in MLflow's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except MLflowError as e:
                return error(e.status, e.code, e.message)
            except StarletteHTTPException as e:  # also FastAPI's own, e.g. a body that is not UTF-8
                code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "RESOURCE_DOES_NOT_EXIST"}
                response = error(e.status_code, code.get(e.status_code, "INVALID_PARAMETER_VALUE"), str(e.detail))
                response.headers.update(e.headers or {})
                return response
            except (RequestValidationError, ValidationError) as e:
                return error(400, "INVALID_PARAMETER_VALUE", invalid(list(e.errors())))
            except Invalid as e:
                return error(400, "INVALID_PARAMETER_VALUE", f"{'.'.join(map(str, e.loc))}: {e.message}")
            except DataError as e:
                return error(400, "INVALID_PARAMETER_VALUE", f"a value cannot be stored by the database: {e.orig}")
            except NotFound as e:
                return error(404, "RESOURCE_DOES_NOT_EXIST", str(e))
            except Conflict as e:
                return error(400, "RESOURCE_ALREADY_EXISTS", str(e))

        return route


class MLflowErrorOut(BaseModel):
    """MLflow's error shape; `message` names the field for INVALID_PARAMETER_VALUE."""

    error_code: str
    message: str


MLFLOW_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": MLflowErrorOut,
        "description": "INVALID_PARAMETER_VALUE (names the field) or RESOURCE_ALREADY_EXISTS",
    },
    401: {"model": MLflowErrorOut, "description": "UNAUTHENTICATED: auth is on and the token is missing or unknown"},
    403: {
        "model": MLflowErrorOut,
        "description": "PERMISSION_DENIED: the token's scope or project does not allow this",
    },
    404: {"model": MLflowErrorOut, "description": "RESOURCE_DOES_NOT_EXIST: no such run or experiment"},
}
# MLflow's limits of one log-batch request (mlflow/utils/validation.py)
MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_ENTITIES_PER_BATCH = 1000, 100, 1000
router = APIRouter(prefix="/api/2.0/mlflow", tags=["mlflow"], route_class=MLflowRoute, responses=MLFLOW_ERRORS)

# What the mlflow client sends: int64 fields as JSON numbers (older clients: strings of
# digits, protobuf's JSON form), doubles as numbers or "NaN" / "Infinity" / "-Infinity".
Digits = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,15}$")]
MStep = Annotated[Annotated[int, Strict(), Field(ge=0, le=MAX_STEP)] | Digits, AfterValidator(int)]
Millis = Annotated[Annotated[int, Strict(), Field(ge=0, le=2**53)] | Digits, AfterValidator(int)]
Double = Annotated[Annotated[float, Strict()] | Literal["NaN", "Infinity", "-Infinity"], AfterValidator(float)]


def _storable(value: str) -> str:
    reason = unstorable(value)
    if reason is not None:
        raise ValueError(reason)
    return value


ParamKey = Annotated[str, StringConstraints(min_length=1, max_length=250), AfterValidator(_storable)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class KeyValue(_Body):
    key: ParamKey
    value: Text | None = None


class Metric(_Body):
    key: Key
    value: Double
    timestamp: Millis | None = None
    step: MStep = 0


class ExperimentCreate(_Body):
    name: Name


class RunCreateBody(_Body):
    experiment_id: Name = DEFAULT_EXPERIMENT[0]
    run_name: Name | None = None
    start_time: Millis | None = None
    tags: list[KeyValue] = []


class RunUpdate(_Body):
    run_id: str | None = None
    run_uuid: str | None = None
    status: str | None = None
    end_time: Millis | None = None
    run_name: Name | None = None


class LogBatch(_Body):
    """MLflow's per-request limits (mlflow/utils/validation.py): the mlflow client splits larger logs."""

    run_id: str
    metrics: Annotated[list[Metric], Field(max_length=MAX_METRICS_PER_BATCH)] = []
    params: Annotated[list[KeyValue], Field(max_length=MAX_PARAMS_TAGS_PER_BATCH)] = []
    tags: Annotated[list[KeyValue], Field(max_length=MAX_PARAMS_TAGS_PER_BATCH)] = []

    @model_validator(mode="after")
    def _entities(self) -> LogBatch:
        total = len(self.metrics) + len(self.params) + len(self.tags)
        if total > MAX_ENTITIES_PER_BATCH:
            raise ValueError(
                f"{total} metrics, params and tags in one request exceed MLflow's limit of "
                f"{MAX_ENTITIES_PER_BATCH}; split the batch"
            )
        return self


class LogMetric(Metric):
    run_id: str


class LogParam(KeyValue):
    run_id: str


def project_of(experiment_id: str) -> str:
    return DEFAULT_EXPERIMENT[1] if experiment_id == DEFAULT_EXPERIMENT[0] else experiment_id


def experiment(name: str, created: float | None = None) -> dict[str, Any]:
    ms = int((created or time.time()) * 1000)
    eid = DEFAULT_EXPERIMENT[0] if name == DEFAULT_EXPERIMENT[1] else name
    return {
        "experiment_id": eid,
        "name": name,
        "artifact_location": "",
        "lifecycle_stage": "active",
        "creation_time": ms,
        "last_update_time": ms,
        "tags": [],
    }


def run_json(run: RunOut) -> dict[str, Any]:
    config = dict(run.config or {})
    tags = config.pop(TAGS, {}) or {}
    experiment_id = DEFAULT_EXPERIMENT[0] if run.project == DEFAULT_EXPERIMENT[1] else run.project
    info = {
        "run_id": run.run_id,
        "run_uuid": run.run_id,
        "run_name": run.name,
        "experiment_id": experiment_id,
        "user_id": "",
        "status": MLFLOW_STATUS.get(run.status, "RUNNING"),
        "start_time": int(run.created_at * 1000),
        "artifact_uri": "",
        "lifecycle_stage": "active",
    }
    if run.status != "running":
        info["end_time"] = int(run.updated_at * 1000)
    params = [{"key": k, "value": v if isinstance(v, str) else str(v)} for k, v in config.items()]
    return {
        "info": info,
        "data": {"metrics": [], "params": params, "tags": [{"key": k, "value": str(v)} for k, v in tags.items()]},
    }


def run_for(store: Store, principal: Principal, run_id: str) -> RunOut:
    try:
        uuid.UUID(run_id)
    except ValueError:
        raise MLflowError(404, "RESOURCE_DOES_NOT_EXIST", f"run_id {run_id!r} does not exist") from None
    run = store.get_run(run_id)
    principal.check_project(run.project)
    return run


def as_records(metrics: list[Metric]) -> list[RecordIn]:
    """One record per MLflow step, product keys added; built before anything is stored."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    times: dict[int, float] = {}
    for m in metrics:  # the validators made step and timestamp ints and value a float
        step = int(m.step)
        by_step[step][m.key] = float(m.value)
        if m.timestamp is not None:
            times[step] = max(times.get(step, 0.0), int(m.timestamp) / 1000.0)
    return [
        RecordIn(step=step, time=times.get(step, time.time()), scalars=product_scalars(values))
        for step, values in sorted(by_step.items())
    ]


def write_metrics(request: Request, store: Store, run_id: str, records: list[RecordIn]) -> None:
    """Store the records and pass them to the ingest listeners."""
    if not records:
        return
    with RUN_LOCKS[uuid.UUID(run_id).int % len(RUN_LOCKS)]:
        result = store.write_records(run_id, uuid.uuid4().hex, records)
        for listener in request.app.state.ingest_listeners if result.new_records else ():
            try:
                listener(store, run_id, result.new_records)
            except Exception:
                log.exception("ingest listener failed on run %s (the MLflow metrics are stored)", run_id)


def merge(store: Store, run: RunOut, params: list[KeyValue], tags: list[KeyValue]) -> None:
    """Params and tags into the run's config, secrets redacted as in a run's config."""
    values: dict[str, Any] = {p.key: p.value for p in params}
    if tags:
        values[TAGS] = {**((run.config or {}).get(TAGS) or {}), **{t.key: t.value for t in tags}}
    if values:
        store.merge_config(run.run_id, clean_config(values))


@router.get("/experiments/get-by-name")
def get_experiment_by_name(
    store: StoreDep, principal: ReadAccess, experiment_name: Annotated[Name, Query()]
) -> dict[str, Any]:
    principal.check_project(experiment_name)
    for project in store.list_projects():
        if project.name == experiment_name:
            return {"experiment": experiment(project.name, project.created_at)}
    raise MLflowError(404, "RESOURCE_DOES_NOT_EXIST", f"Could not find experiment with name {experiment_name!r}")


@router.get("/experiments/get")
def get_experiment(principal: ReadAccess, experiment_id: Annotated[Name, Query()]) -> dict[str, Any]:
    name = project_of(experiment_id)
    principal.check_project(name)
    return {"experiment": experiment(name)}


@router.post("/experiments/create")
def create_experiment(body: ExperimentCreate, principal: WriteAccess) -> dict[str, Any]:
    """The project exists from its first run on; its experiment id is its name."""
    principal.check_project(body.name)
    return {"experiment_id": experiment(body.name)["experiment_id"]}


@router.post("/runs/create")
def create_run(body: RunCreateBody, store: StoreDep, principal: WriteAccess) -> dict[str, Any]:
    project = project_of(body.experiment_id)
    principal.check_project(project)
    tags = {t.key: t.value for t in body.tags}
    name = body.run_name or tags.get("mlflow.runName") or f"mlflow-{uuid.uuid4().hex[:8]}"
    run = store.create_run(RunCreate(project=project, name=name, config={TAGS: tags} if tags else None))
    return {"run": run_json(run)}


@router.post("/runs/update")
def update_run(body: RunUpdate, store: StoreDep, principal: WriteAccess) -> dict[str, Any]:
    run = run_for(store, principal, body.run_id or body.run_uuid or "")
    if body.status is not None:
        if body.status not in STATUS:
            raise MLflowError(400, "INVALID_PARAMETER_VALUE", f"status={body.status!r}: one of {', '.join(STATUS)}")
        run = store.update_run(run.run_id, STATUS[body.status])
    return {"run_info": run_json(run)["info"]}


@router.get("/runs/get")
def get_run(
    store: StoreDep,
    principal: ReadAccess,
    run_id: Annotated[str | None, Query()] = None,
    run_uuid: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    return {"run": run_json(run_for(store, principal, run_id or run_uuid or ""))}


@router.post("/runs/log-batch")
def log_batch(body: LogBatch, request: Request, store: StoreDep, principal: WriteAccess) -> dict[str, Any]:
    run = run_for(store, principal, body.run_id)
    records = as_records(body.metrics)
    merge(store, run, body.params, body.tags)
    write_metrics(request, store, run.run_id, records)
    return {}


@router.post("/runs/log-metric")
def log_metric(body: LogMetric, request: Request, store: StoreDep, principal: WriteAccess) -> dict[str, Any]:
    run = run_for(store, principal, body.run_id)
    write_metrics(request, store, run.run_id, as_records([body]))
    return {}


@router.post("/runs/log-parameter")
def log_parameter(body: LogParam, store: StoreDep, principal: WriteAccess) -> dict[str, Any]:
    merge(store, run_for(store, principal, body.run_id), [body], [])
    return {}


@router.post("/runs/set-tag")
def set_tag(body: LogParam, store: StoreDep, principal: WriteAccess) -> dict[str, Any]:
    merge(store, run_for(store, principal, body.run_id), [], [body])
    return {}


@router.get("/metrics/get-history")
def get_metric_history(
    store: StoreDep,
    principal: ReadAccess,
    metric_key: Annotated[Key, Query()],
    run_id: Annotated[str | None, Query()] = None,
    run_uuid: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    run = run_for(store, principal, run_id or run_uuid or "")
    return {
        "metrics": [
            {"key": metric_key, "value": _double(value), "step": step, "timestamp": round(time * 1000)}
            for step, value, time in store.scalar_history(run.run_id, metric_key)
        ]
    }


def _double(value: float) -> float | str:
    """A double as protobuf's JSON mapping (MLflow's) writes it: non-finite values as "NaN", "Infinity", "-Infinity"."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


@router.api_route("/{path:path}", methods=["GET", "POST", "PATCH", "DELETE", "PUT"], include_in_schema=False)
def unknown(path: str, request: Request) -> JSONResponse:
    """404 for an endpoint not implemented; 405 (with Allow) for one implemented under another method."""
    full = f"{router.prefix}/{path}"
    allowed = sorted(
        {
            m
            for r in router.routes
            if isinstance(r, APIRoute) and r.include_in_schema and r.path == full
            for m in r.methods or ()
        }
    )
    if allowed:
        response = error(405, "ENDPOINT_NOT_FOUND", f"{full} takes {', '.join(allowed)}, not {request.method}")
        response.headers["Allow"] = ", ".join(allowed)
        return response
    return error(404, "ENDPOINT_NOT_FOUND", f"MHPO Monitor does not implement the MLflow endpoint {full}")
